#!/usr/bin/env bash
# Idempotent: install Debian's Docker engine, compose and debootstrap, then start dockerd if no
# daemon answers. The daemon gets no bridge and no iptables rules: containers run with network
# "none" (probe) or "host" (servers), so every byte stays on this machine's loopback.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/harness-dockerd.log}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
# Debian bookworm ships compose v1 (docker-compose 1.29, supports profiles and GPU reservations).
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-docker: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if docker info >/dev/null 2>&1; then
  echo "setup-docker: daemon already answers"
  exit 0
fi

echo "setup-docker: starting dockerd (log: $LOG)"
$SUDO sh -c "nohup dockerd --bridge=none --iptables=false --ip6tables=false >'$LOG' 2>&1 &"
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "setup-docker: daemon up ($(docker version --format '{{.Server.Version}}'))"
    exit 0
  fi
  sleep 1
done
echo "setup-docker: dockerd did not answer within 60 s; last log lines:" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
