#!/bin/sh
# bundle.sh — a self-contained copy of pie's CUDA build for a plain
# Ubuntu 24.04 + CUDA 13 machine (no Debian packages there).
#
#   scripts/bundle.sh [BUILD_DIR] [OUT]     (defaults: build-cuda .carry/bundle)
#
# Copies the pie binary and the CUDA test/bench binaries (stripped) into
# OUT/bin, and every shared library ldd lists for them into OUT/lib except
# those the target has anyway: glibc, libstdc++/libgcc_s (newer there), the
# CUDA driver and CUDA's own libraries (cuBLASLt comes from the target's
# /usr/local/cuda; cudart is linked statically). OUT/run NAME ARGS... runs
# a binary with LD_LIBRARY_PATH set; OUT.tar.xz packs the folder.
set -eu
build=${1:-build-cuda}
out=${2:-.carry/bundle}
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for b in "$build/pie" "$build"/tests/cuda/test_cuda_kernels \
         "$build"/tests/cuda/test_cuda_model "$build"/tests/cuda/test_cuda_faults \
         "$build"/tests/cuda/test_cuda_fuzz \
         "$build"/tests/cuda/bench_cuda_attn "$build"/tests/cuda/bench_lt_search \
         "$build"/tests/cuda/bench_kv_read "$build"/tests/control/bench_control; do
    [ -x "$b" ] || continue
    cp "$b" "$out/bin/"
    case "$b" in */test_cuda_model) ;; *) strip "$out/bin/$(basename "$b")" ;; esac
    ldd "$b" | awk '/=>/ && $3 ~ /^\// { print $1, $3 }' |
    while read -r name path; do
        case "$name" in
        libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|\
        libstdc++*|libgcc_s*|libcuda.so*|libcublas*|libcudart*|libnvidia*)
            continue ;;
        esac
        [ -e "$out/lib/$name" ] || cp -L "$path" "$out/lib/$name"
    done
done
# Inferlets: the bundled .wasm files beside pie (where `pie run NAME` looks),
# wasm2c and wasm-rt.h (the target has no wabt), and the generated host
# prototypes, which the runtime force-includes from the absolute path it was
# built with (recorded in host-header-path; `run` restores it there).
if [ -d "$build/inferlets" ]; then
    mkdir -p "$out/bin/inferlets" "$out/include"
    cp "$build"/inferlets/*.wasm "$out/bin/inferlets/" 2>/dev/null || true
    cp "$(command -v wasm2c)" "$out/bin/"
    cp /usr/include/wasm-rt.h "$out/include/"
    hdr=$(cd "$build" && pwd)/runtime/gen/pie_api_host.h
    cp "$hdr" "$out/include/"
    echo "$hdr" > "$out/host-header-path"
fi
git -C "$(dirname "$0")/.." rev-parse --short HEAD > "$out/commit" 2>/dev/null || true
cat > "$out/run" <<'EOS'
#!/bin/sh
# run NAME ARGS... — runs bin/NAME with the bundled libraries (and, for
# inferlets, the bundled wasm2c and headers).
d=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$d/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
export PATH="$d/bin:$PATH" C_INCLUDE_PATH="$d/include${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}"
if [ -f "$d/host-header-path" ]; then
    h=$(cat "$d/host-header-path")
    [ -f "$h" ] || { mkdir -p "$(dirname "$h")" && cp "$d/include/pie_api_host.h" "$h"; }
fi
n=$1; shift
exec "$d/bin/$n" "$@"
EOS
chmod +x "$out/run"
tar -C "$(dirname "$out")" -cJf "$out.tar.xz" "$(basename "$out")"
ls -la "$out/bin" "$out/lib"
ls -la "$out.tar.xz"
