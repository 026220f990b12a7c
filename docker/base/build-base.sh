#!/usr/bin/env bash
# A minimal Debian base image built locally, for hosts that cannot pull one (air-gapped, this
# project's CI): debootstrap --variant=minbase + docker import. Skipped when the image exists.
#   docker/base/build-base.sh [IMAGE] [SUITE] [MIRROR]
set -euo pipefail

IMAGE=${1:-${HARNESS_BASE_IMAGE:-harness-base:bookworm}}
SUITE=${2:-bookworm}
MIRROR=${3:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}

if docker image inspect "$IMAGE" >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
  echo "build-base: $IMAGE present ($(docker image inspect -f '{{.Id}}' "$IMAGE"))"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base: debootstrap missing: run scripts/setup-docker.sh" >&2; exit 1; }

ROOT=$(mktemp -d /tmp/harness-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "build-base: debootstrap --variant=minbase $SUITE -> $ROOT"
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
  tail -n 30 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# Same trimming as the official debian images: no apt caches, no docs, no man pages.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/*
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
  > "$ROOT/etc/apt/sources.list"
echo 'APT::Install-Recommends "false";' > "$ROOT/etc/apt/apt.conf.d/99norecommends"

tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$IMAGE" >/dev/null
echo "build-base: built $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE"))"
