#!/usr/bin/env bash
# Installs every Debian package pie needs on a fresh Debian 12 machine.
# Non-interactive and idempotent: packages already present are skipped.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config
  clang lld wabt wasi-libc libclang-rt-14-dev libclang-rt-14-dev-wasm32 binaryen
  libjansson-dev libmsgpack-dev libcivetweb-dev libpcre2-dev
  libopenblas-dev libsodium-dev libxxhash-dev libcmocka-dev libutf8proc-dev
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
