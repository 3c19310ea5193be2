#!/usr/bin/env bash
# Installs the Debian packages Ferry needs (cross compiler, QEMU as the reference machine,
# OpenSBI firmware, dtc). Idempotent: does nothing when all are present.
set -euo pipefail
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "ferry: missing system packages: ${missing[*]}" >&2
  echo "ferry: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "ferry: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
