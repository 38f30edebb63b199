#!/usr/bin/env bash
# Runs pie's test suite: the normal build (build/) and the sanitizer build
# (build-asan/, ASan + UBSan, CPU only). Set PIE_TEST_NO_ASAN=1 to skip the
# second. GPU tests skip themselves when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 900
if [ "${PIE_TEST_NO_ASAN:-0}" != 1 ]; then
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DPIE_SANITIZE=ON \
        -DPIE_CUDA=OFF >/dev/null
  cmake --build build-asan -j"$(nproc)"
  ASAN_OPTIONS=detect_leaks=1 \
    ctest --test-dir build-asan --output-on-failure -j"$(nproc)" --timeout 1800
fi
