#!/usr/bin/env bash
# Debian packages the harness and its tests need: the allocator libraries and GNU time.
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
pkgs=(libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0 time)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
