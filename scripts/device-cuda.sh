#!/bin/bash
# device-cuda.sh PHASE... — runs pie's CUDA checks and benchmarks on a GPU
# machine from the bundle (scripts/bundle.sh) carried in .carry/. Logs go to
# $OUT (or ./out). Phases:
#   tests   kernel differential test + model tests (.carry/shared models)
#   hf1b    transformers vs pie on a random Llama-3.2-1B-shaped checkpoint
#   hf8b    the same for Llama-3.1-8B
#   bench1b / bench8b   pie bench forward: decode B=1,16,64,256 x ctx 512,
#           2048 and prefill 512/2048
#   attn    paged decode attention bandwidth (bench_cuda_attn)
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/pie
tar -C /tmp/pie -xJf .carry/bundle.tar.xz
R=/tmp/pie/bundle/run
if [ ! -e /work/shared ]; then mkdir -p /work && ln -s "$PWD/.carry/shared" /work/shared; fi
nvidia-smi -L
log() { echo "== $*" | tee -a "$OUT/summary.log"; }
bench() {   # model batch prompt gen [chunk]
    timeout 200 $R pie bench forward --backend cuda --model "random:$1" \
        --batch "$2" --prompt-len "$3" --gen "$4" --chunk "${5:-4096}" \
        2>&1 | tee -a "$OUT/bench.log" | grep -E "prefill|decode|error|pie" \
        | sed "s/^/$1 B=$2 L=$3: /" | tee -a "$OUT/summary.log"
}
for phase in "$@"; do
    case $phase in
    tests)
        log tests
        timeout 150 $R test_cuda_kernels > "$OUT/kernels.log" 2>&1
        echo "kernels rc=$?" | tee -a "$OUT/summary.log"; tail -4 "$OUT/kernels.log"
        PIE_CUDA_PARTIAL_SHARED=1 timeout 200 $R test_cuda_model > "$OUT/model.log" 2>&1
        echo "model rc=$?" | tee -a "$OUT/summary.log"; tail -30 "$OUT/model.log"
        ;;
    hf1b|hf8b)
        s=llama-3.2-1b; [ $phase = hf8b ] && s=llama-3.1-8b
        log "$phase"
        PYTHONUNBUFFERED=1 timeout 300 python3 scripts/hf_random_compare.py $s /tmp/hf-$s \
            > "$OUT/$phase-py.log" 2>&1; echo "py rc=$?"; tail -5 "$OUT/$phase-py.log"
        PIE_CUDA_HF_DIRS=/tmp/hf-$s timeout 200 $R test_cuda_model > "$OUT/$phase.log" 2>&1
        rc=$?
        echo "$phase rc=$rc" | tee -a "$OUT/summary.log"
        tail -6 "$OUT/$phase.log" | tee -a "$OUT/summary.log"
        if [ $rc -gt 1 ] && [ $rc -ne 124 ]; then   # crashed: where?
            LD_LIBRARY_PATH=/tmp/pie/bundle/lib:/usr/local/cuda/lib64 PIE_CUDA_HF_DIRS=/tmp/hf-$s \
                timeout 200 cuda-gdb -batch -ex run -ex bt --args /tmp/pie/bundle/bin/test_cuda_model \
                2>&1 | tail -30 | tee -a "$OUT/summary.log"
        fi
        rm -rf /tmp/hf-$s
        ;;
    bench1b|bench8b)
        m=llama-3.2-1b; [ $phase = bench8b ] && m=llama-3.1-8b
        log "$phase"
        bench $m 4 2048 0 2048
        bench $m 8 512 0 512
        for L in 512 2048; do for B in 1 16 64 256; do bench $m $B $L 24; done; done
        ;;
    attn)
        log attn
        timeout 120 $R bench_cuda_attn 2>&1 | tee -a "$OUT/summary.log"
        ;;
    esac
done
log done
