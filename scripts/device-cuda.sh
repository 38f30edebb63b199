#!/bin/bash
# device-cuda.sh PHASE... — runs pie's CUDA checks and benchmarks on a GPU
# machine from the bundle (scripts/bundle.sh) carried in $PIE_CARRY (default
# .carry/: bundle.tar.xz, and shared/models/ or shared-models.tar.xz with
# the test checkpoints). Logs go to $OUT (or ./out). Phases:
#   tests   kernel differential test, model tests (.carry/shared models),
#           failure-path tests (test_cuda_faults)
#   hf1b    transformers vs pie on a random Llama-3.2-1B-shaped checkpoint
#   hf8b    the same for Llama-3.1-8B
#   bench1b / bench8b   pie bench forward: decode B=1,16,64,256 x ctx 512,
#           2048 and prefill 512/2048
#   attn    paged decode attention bandwidth (bench_cuda_attn)
#   ab      before/after: the bundle in $PIE_CARRY/old.tar.xz vs this one,
#           interleaved, prefill and decode of the 1B and 8B shapes
#   gen     pie bench generate inferlet/native ratio at C = 1, 64, 256
#   graphs  decode steps with CUDA graphs and with PIE_CUDA_NO_GRAPH=1
#   gemv    decode with gemv.cu, with cuBLASLt only, and without PDL
#   kernels the kernel differential test alone
#   tune    the timed matmul choices (cuBLASLt vs gemv.cu) of both shapes
#   pdl     decode with PDL for gemv.cu (default), for all, none; cuBLASLt only
#   pre     prefill tok/s, 8B 4 x 2048 and 16 x 512, 1B 4 x 2048
#   splits  decode at several PIE_CUDA_SPLIT_BLOCKS
#   b1      batch-1 and 16 decode, default and PIE_CUDA_NO_GEMV=1
#   nsys    per-kernel GPU time of three decode shapes (nsys)
#   prof    per-kernel GPU time of 1B decode (nsys) and speed of light of
#           the decode kernels (ncu), where those tools are installed
#   attnmma decode attention bandwidth, tensor-core kernel only
#   b16     1B batch-16 decode three times each, gemv.cu and cuBLASLt only
#   attnpre causal prefill attention alone (TFLOP/s)
#   attnexp decode attention with page size 64, pages in order, 2 blocks/SM
#   profile per-operation GPU time of decode steps (PIE_CUDA_PROFILE=1)
#   thr     decode at the throughput targets' shapes (1B B=64/256, 8B B=256)
#   ltsearch cuBLASLt's heuristic candidates against every configuration it
#           accepts, for the 8B B=256 and 1B B=64 decode matmuls
#           (bench_lt_search)
#   ncuattn ncu of decode attention (stalls, memory, occupancy), three shapes
#   preab   prefill of old.tar.xz and this build, interleaved, twice
#   nomerge decode attention with and without its merge kernel (timing only)
#   genab   gen for old.tar.xz, then for this build
#   decab   decode of old.tar.xz and this build at batch 1, 16 and 64, twice
#           (DECAB_CFGS="model B ctx steps,...": other shapes)
#   proffill per-operation GPU time of an 8B 4 x 2048 prefill
#   wg      prefill attention and 8B prefill, wgmma vs PIE_CUDA_NO_WGMMA=1
#           (the tests and kernels phases run the kernel test both ways)
#   attnab  decode attention (tensor-core kernel), old.tar.xz and this build
#           interleaved, twice
#   wholeab decode attention and decode steps with the cut plan only
#           (PIE_CUDA_DEC_WHOLE=0), by default, and on whole items at two
#           blocks per SM (PIE_CUDA_DEC_WHOLE=2) (WHOLE_CFGS: attention
#           shapes; WHOLE_STEPS="model B ctx steps,...": step shapes)
#   trace   kernel timeline of decode steps (PIE_CUDA_TRACE, CUPTI) with the
#           cut plan, the default and two per SM (TRACE_CFGS="model B ctx
#           steps,...")
#   decblk  decode attention at several grid sizes (PIE_CUDA_DEC_BLOCKS),
#           with and without the merge kernel
#   mega    batch-1 decode as one kernel (mega.cu, PIE_CUDA_MEGA=1) vs the
#           default
#   steps   decode steps' host planning, GPU span and time between forwards
#           (PIE_CUDA_STEPS=1) at four shapes
#   envab   a setting (ENVAB="VAR=value ...") against the default in this
#           build, alternating (ENVAB_CFGS="model B ctx steps,...")
#   attnsets decode attention alone (bench_cuda_attn) under several
#           settings in turn (ATTN_SETS="VAR=v;VAR=w;-", ATTN_CFGS="hd,B,ctx
#           ...", ATTN_REPS)
#   envsets several settings in this build (ENVSETS="VAR=v VAR2=w;VAR=u;-",
#           "-" the default; a setting RUN=path runs another bundle's run),
#           each rep in another order (ENVAB_CFGS, ENVAB_REPS as for envab)
#   ncugemv ncu of gemv.cu's decode matmuls (8B and 1B batch 1)
#   gemvsweep gemv.cu's warps compared as whole decode steps in one process
#           (PIE_CUDA_GEMV_SWEEP, sweep.c): at 1B batch 1 and 4 and 8B batch
#           1, the tuner's choice against each weight's other warp counts
#   spread  batch 1 of both shapes in several processes (SPREAD_RUNS, 4):
#           each one's tuned gemv.cu warps per weight shape and decode GPU
#           span (PIE_CUDA_TUNE_LOG, PIE_CUDA_STEPS), to see how much the
#           step varies between processes and which choice goes with it
#           (NOTES.md, round 22)
#   kvread  decode attention's KV reads alone (bench_kv_read) at the 8B
#           B=256 ctx 512 and B=16 ctx 2048 shapes
#   gap     the host's time between two fires of the control layer
#           (bench_control gap: chained generations on a fake backend whose
#           forwards sleep 1 ms, C = 1 and 64), three runs
#   sass    the machine code of the kernels whose (mangled) names contain
#           SASS_FUN (default flash_wg_kernel) in the bundle's
#           test_cuda_kernels, one file each, and their registers
#           (res-usage.txt), packed into sass.tgz (for a
#           kernel that is wrong where its PTX looks right: NOTES.md,
#           round 24; cuobjdump -fun wants the whole mangled name)
#   long    batch 16 at long contexts (ctx 2048-16384): decode attention and
#           8B decode steps on the cut plan (PIE_CUDA_DEC_WHOLE=0) and on
#           one block per SM (=1), and by the rule with the bound timed at
#           start (dec_calib.c): which wins differs between H100s
#           (NOTES.md, rounds 11 and 12)
set -u
OUT=${OUT:-$PWD/out}
C=${PIE_CARRY:-.carry}
mkdir -p "$OUT" /tmp/pie
tar -C /tmp/pie -xJf "$C/bundle.tar.xz"
if [ -f "$C/shared-models.tar.xz" ]; then
    mkdir -p /tmp/pie/shared && tar -C /tmp/pie/shared -xJf "$C/shared-models.tar.xz"
else
    ln -sfn "$PWD/$C/shared" /tmp/pie/shared
fi
R=/tmp/pie/bundle/run
if [ -f "$C/old.tar.xz" ]; then     # an earlier build for before/after runs
    mkdir -p /tmp/pie-old && tar -C /tmp/pie-old -xJf "$C/old.tar.xz"
fi
RO=/tmp/pie-old/bundle/run
if [ ! -e /work/shared ]; then mkdir -p /work && ln -s /tmp/pie/shared /work/shared; fi
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi -L
# clocks and power cap: H100s of the device tool differ (NOTES.md, round 8)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,pstate \
    --format=csv,noheader 2>&1 | tee -a "$OUT/summary.log"
log() { echo "== $*" | tee -a "$OUT/summary.log"; }
# The device tool returns at most 8 files from $OUT, and none when there
# are more (the tests phase alone writes 17 logs): at exit (also after a
# SIGTERM; not after a SIGKILL), every file in $OUT itself but summary.log
# goes into one archive, logs-N.tar.gz (N counts this call's invocations of
# the script, so none overwrites an earlier one's); folders stay as they
# are. Two invocations must not share $OUT at the same time.
pack_logs() {
    local n=1
    [ -n "$(find "$OUT" -mindepth 1 -maxdepth 1 -type f ! -name summary.log \
            ! -name 'logs-*.tar.gz' -print -quit)" ] || return 0
    while [ -e "$OUT/logs-$n.tar.gz" ]; do n=$((n + 1)); done
    find "$OUT" -mindepth 1 -maxdepth 1 -type f ! -name summary.log \
        ! -name 'logs-*.tar.gz' -printf '%P\0' |
        tar -C "$OUT" -czf "$OUT/logs-$n.tar.gz" --null -T - --remove-files
}
trap pack_logs EXIT
bench() {   # model batch prompt gen [chunk]
    timeout 200 ${RUN:-$R} pie bench forward --backend cuda --model "random:$1" \
        --batch "$2" --prompt-len "$3" --gen "$4" --chunk "${5:-4096}" \
        2>&1 | tee -a "$OUT/bench.log" | grep -E "prefill|decode|error|pie" \
        | sed "s/^/${TAG:-}$1 B=$2 L=$3: /" | tee -a "$OUT/summary.log"
}
model() {   # log-suffix [VAR=value...]: the model test with those settings
    local tag=$1
    shift
    env "$@" PIE_CUDA_PARTIAL_SHARED=1 timeout 200 $R test_cuda_model \
        > "$OUT/model$tag.log" 2>&1
    local rc=$?
    echo "model${*:+ ($*)} rc=$rc" | tee -a "$OUT/summary.log"
}
abench() {  # reps config...: each config with old.tar.xz and this build,
            # old first in odd reps and new first in even ones, so that
            # neither build always runs second
    local reps=$1 i cfg
    shift
    for i in $(seq "$reps"); do
        for cfg in "$@"; do
            [ $((i % 2)) = 0 ] && TAG="new " bench $cfg
            RUN=$RO TAG="old " bench $cfg
            [ $((i % 2)) = 1 ] && TAG="new " bench $cfg
        done
    done
}
for phase in "$@"; do
    case $phase in
    tests)
        log tests
        timeout 150 $R test_cuda_kernels > "$OUT/kernels.log" 2>&1
        echo "kernels rc=$?" | tee -a "$OUT/summary.log"; tail -4 "$OUT/kernels.log"
        # the mma.sync prefill kernel that wgmma replaces at head dim 128
        PIE_CUDA_NO_WGMMA=1 timeout 150 $R test_cuda_kernels > "$OUT/kernels-nowg.log" 2>&1
        echo "kernels (PIE_CUDA_NO_WGMMA) rc=$?" | tee -a "$OUT/summary.log"
        # wgmm.cu's tests on clusters of 2
        PIE_KTEST_WGMM=1 PIE_CUDA_WGMM_CL=2 timeout 150 $R test_cuda_kernels > "$OUT/kernels-wgcl2.log" 2>&1
        echo "kernels (wgmm, PIE_CUDA_WGMM_CL=2) rc=$?" | tee -a "$OUT/summary.log"
        # failure paths: metadata growth, refused clusters, a lost context
        timeout 150 $R test_cuda_faults > "$OUT/faults.log" 2>&1
        echo "faults rc=$?" | tee -a "$OUT/summary.log"; tail -6 "$OUT/faults.log"
        timeout 150 $R test_cuda_faults lost > "$OUT/lost.log" 2>&1
        echo "faults lost rc=$?" | tee -a "$OUT/summary.log"; tail -4 "$OUT/lost.log"
        # the CUDA backend against the CPU one on the batch fuzzer's corpus
        timeout 150 $R test_cuda_fuzz fuzz/corpus/batch > "$OUT/fuzz.log" 2>&1
        echo "fuzz corpus rc=$?" | tee -a "$OUT/summary.log"; tail -2 "$OUT/fuzz.log"
        model ""                                # the default plans
        tail -30 "$OUT/model.log"
        # every decode step on the whole-item plan: one, two, four blocks
        # per SM (four where resident: head dim below 128)
        model -whole PIE_CUDA_DEC_WHOLE=1
        model -whole2 PIE_CUDA_DEC_WHOLE=2
        model -whole4 PIE_CUDA_DEC_WHOLE=4
        # small batches on the cut plan, not the cluster plan
        model -nocluster PIE_CUDA_DEC_CLUSTER=0
        # every decode step that fits on clusters of 3 (head dims split
        # unevenly over the cluster's blocks)
        model -cluster3 PIE_CUDA_DEC_CLUSTER=3
        # decode steps with the qkv matmul and qkv_post as two kernels
        model -noqkvfuse PIE_CUDA_NO_QKV_FUSE=1
        # two per SM with a cut-plan grid smaller than that (bstart sizes)
        model -whole2-64 PIE_CUDA_DEC_BLOCKS=64 PIE_CUDA_DEC_WHOLE=2
        ;;
    envab)      # one setting against the default in this build, alternating:
                # ENVAB="VAR=value ..." (default PIE_CUDA_NO_QKV_FUSE=1),
                # ENVAB_CFGS="model B ctx steps,...", ENVAB_REPS (2)
        cfgs=("llama-3.2-1b 1 512 48" "llama-3.1-8b 1 512 24"
              "llama-3.2-1b 16 512 48" "llama-3.1-8b 16 512 24")
        [ -n "${ENVAB_CFGS:-}" ] && IFS=, read -ra cfgs <<< "$ENVAB_CFGS"
        read -ra envs <<< "${ENVAB:-PIE_CUDA_NO_QKV_FUSE=1}"
        for i in $(seq "${ENVAB_REPS:-2}"); do
            for cfg in "${cfgs[@]}"; do
                [ $((i % 2)) = 0 ] && TAG="dflt " bench $cfg
                ( export "${envs[@]}"; TAG="set " bench $cfg )
                [ $((i % 2)) = 1 ] && TAG="dflt " bench $cfg
            done
        done
        ;;
    envsets)    # several settings in this build, each rep in another order:
                # ENVSETS="VAR=v VAR2=w;VAR=u;-" ("-": the default),
                # ENVAB_CFGS as for envab, ENVAB_REPS (2)
        IFS=';' read -ra sets <<< "${ENVSETS:--}"
        IFS=, read -ra cfgs <<< "${ENVAB_CFGS:-llama-3.1-8b 256 512 16}"
        n=${#sets[@]}
        for i in $(seq "${ENVAB_REPS:-2}"); do
            for cfg in "${cfgs[@]}"; do
                for j in $(seq 0 $((n - 1))); do
                    r=$(( (i - 1) / 2 )); k=$(( (j + r) % n ))
                    [ $((i % 2)) = 0 ] && k=$(( (n - 1 - j + r) % n ))
                    read -ra envs <<< "${sets[$k]}"
                    [ "${envs[0]:-}" = - ] && envs=()
                    ( [ ${#envs[@]} -gt 0 ] && export "${envs[@]}"
                      TAG="[${sets[$k]//\//:}] " bench $cfg )
                done
            done
        done
        ;;
    attnsets)   # decode attention alone under several settings, in turn:
                # ATTN_SETS as ENVSETS, ATTN_CFGS="hd,B,ctx ..." (tensor-
                # core kernel, graph timing), ATTN_REPS (2)
        IFS=';' read -ra sets <<< "${ATTN_SETS:--}"
        for i in $(seq "${ATTN_REPS:-2}"); do
            for cfg in ${ATTN_CFGS:-128,16,2048 64,16,2048 64,16,8192}; do
                for s in "${sets[@]}"; do
                    read -ra envs <<< "$s"
                    [ "${envs[0]:-}" = - ] && envs=()
                    ( [ ${#envs[@]} -gt 0 ] && export "${envs[@]}"
                      echo -n "[$s] " | tee -a "$OUT/summary.log"
                      PIE_ATTN_ONLY=$cfg timeout 60 $R bench_cuda_attn 2>&1 \
                          | grep "attn mma" | tee -a "$OUT/summary.log" )
                done
            done
        done
        ;;
    gemvsweep)  # configurations take turns in segments of 16 steps; the
                # backend prints each one's mean step time at exit
        log "gemvsweep"
        sw() {  # model batch gen configs
            PIE_CUDA_GEMV_SWEEP="$4" timeout 200 $R pie bench forward --backend cuda \
                --model random:$1 --batch $2 --prompt-len 512 --gen $3 \
                > "$OUT/gemvsweep-$1-$2.log" 2>&1
            echo "$1 B=$2 rc=$?" | tee -a "$OUT/summary.log"
            grep -E "sweep|decode:" "$OUT/gemvsweep-$1-$2.log" | sed "s/^/$1 B=$2: /" \
                | tee -a "$OUT/summary.log"
        }
        sw llama-3.2-1b 1 2048 "|16384x2048:2|16384x2048:8|3072x2048:4|2048x8192:4|2048x2048:4|128256x2048:4"
        sw llama-3.2-1b 4 1024 "|16384x2048:2|16384x2048:8|3072x2048:4"
        sw llama-3.1-8b 1 1024 "|6144x4096:8|28672x4096:4|4096x14336:4|4096x4096:4|128256x4096:4"
        ;;
    sass)       # SASS of the matching kernels (cuobjdump of the CUDA toolkit)
        log "sass ${SASS_FUN:-flash_wg_kernel}"
        rm -rf /tmp/pie/sass && mkdir -p /tmp/pie/sass
        cuobjdump -res-usage -sass /tmp/pie/bundle/bin/test_cuda_kernels \
            > /tmp/pie/all.sass 2>&1
        echo "cuobjdump rc=$?" | tee -a "$OUT/summary.log"
        # one file a function: from its "Function :" line to the next
        # function, cubin header or resource listing; the resource lines
        # (" Function NAME:", then its registers) of the matching ones
        # into res-usage.txt
        awk -v pat="${SASS_FUN:-flash_wg_kernel}" -v dir=/tmp/pie/sass '
            /Function : |^Fatbin|^Resource usage/ { f = "" }
            /Function : / && index($0, pat) { f = dir "/" $3 ".sass"; n++ }
            f { print > f }
            res { print > (dir "/res-usage.txt"); res = 0 }
            /^ Function [^:]*:$/ && index($0, pat) { print > (dir "/res-usage.txt"); res = 1 }
            END { print n + 0, "functions" }' /tmp/pie/all.sass | tee -a "$OUT/summary.log"
        tar -C /tmp/pie/sass -czf "$OUT/sass.tgz" .
        ;;
    spread)     # per process: gemv.cu's warps taken per weight shape (at
                # batches of 1..8) and the decode GPU span
        log "spread"
        for m in llama-3.2-1b llama-3.1-8b; do
            for i in $(seq "${SPREAD_RUNS:-4}"); do
                PIE_CUDA_TUNE_LOG=1 PIE_CUDA_STEPS=1 timeout 200 $R pie bench forward \
                    --backend cuda --model random:$m --batch 1 --prompt-len 512 \
                    --gen 200 > "$OUT/spread-$m-$i.log" 2>&1
                w=$(grep "(m 8)" "$OUT/spread-$m-$i.log" | sed -E \
                    -e 's#.*tune n ([0-9]+) k ([0-9]+):.* -> gemv r([0-9]+)$#\1x\2:r\3#' \
                    -e 's#.*tune n ([0-9]+) k ([0-9]+):.* -> cublasLt r0$#\1x\2:cublasLt#' \
                    | tr '\n' ' ')
                span=$(grep -o "gpu span [0-9.]*" "$OUT/spread-$m-$i.log")
                echo "$m run $i: $span; weight:warps $w" | tee -a "$OUT/summary.log"
            done
        done
        ;;
    ncugemv)    # ncu of decode matmuls on gemv.cu (8B and 1B batch 1, no graph):
                # time, DRAM throughput, occupancy, stall reasons per kernel
        m="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
        for mm in llama-3.1-8b llama-3.2-1b; do
            PIE_CUDA_GEMV=1 PIE_CUDA_NO_GRAPH=1 timeout 300 ncu --metrics "$m" -k regex:"gemv_kernel" \
                --launch-skip 1200 --launch-count 8 $R pie bench forward --backend cuda \
                --model random:$mm --batch 1 --prompt-len 64 --gen 24 \
                > "$OUT/ncu_gemv_$mm.txt" 2>&1
            echo "ncu gemv $mm rc=$?" | tee -a "$OUT/summary.log"
        done
        ;;
    long)       # one block an SM against the cut plan on long items, and the
                # calibrated rule (dec_calib.c)
        log long
        for w in 0 1 rule; do
            for L in 2048 4096 8192 16384; do
                ( if [ $w = rule ]; then unset PIE_CUDA_DEC_WHOLE; else export PIE_CUDA_DEC_WHOLE=$w; fi
                  PIE_ATTN_ONLY=128,16,$L timeout 60 $R bench_cuda_attn 2>&1 \
                      | sed "s/^/whole=$w /" | tee -a "$OUT/summary.log" )
            done
        done
        for i in 1 2; do
            for w in 0 1 rule; do
                ( if [ $w = rule ]; then unset PIE_CUDA_DEC_WHOLE; else export PIE_CUDA_DEC_WHOLE=$w; fi
                  TAG="whole=$w " bench llama-3.1-8b 16 8192 16 )
            done
        done
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
    ab)     # the earlier build (old.tar.xz) and this one, interleaved
        log "ab: old = $(cat /tmp/pie-old/bundle/commit 2>/dev/null), new"
        abench 1 "llama-3.2-1b 4 2048 0 2048" "llama-3.1-8b 4 2048 0 2048" \
               "llama-3.2-1b 1 2048 24" "llama-3.2-1b 16 2048 24" \
               "llama-3.2-1b 64 2048 24" "llama-3.2-1b 256 2048 24" \
               "llama-3.2-1b 1 512 24" "llama-3.1-8b 1 2048 24" \
               "llama-3.1-8b 16 2048 24" "llama-3.1-8b 64 2048 24" \
               "llama-3.1-8b 256 512 24"
        ;;
    decab)      # decode of the earlier build and this one, interleaved
        cfgs=("llama-3.2-1b 1 512 48" "llama-3.2-1b 64 512 48"
              "llama-3.1-8b 1 2048 24" "llama-3.1-8b 16 2048 24"
              "llama-3.1-8b 64 2048 16" "llama-3.1-8b 256 512 16")
        [ -n "${DECAB_CFGS:-}" ] && IFS=, read -ra cfgs <<< "$DECAB_CFGS"
        abench "${DECAB_REPS:-2}" "${cfgs[@]}"
        ;;
    wg)         # prefill attention and 8B prefill: wgmma, then PIE_CUDA_NO_WGMMA=1
        for i in $(seq "${WG_REPS:-2}"); do
            for k in wgmma mma.sync; do
                (   [ $k = mma.sync ] && export PIE_CUDA_NO_WGMMA=1
                    log "wg $k"
                    PIE_ATTN_PREFILL_ONLY=1 timeout 120 $R bench_cuda_attn 2>&1 \
                        | grep "hd 128" | tee -a "$OUT/summary.log"
                    TAG="$k " bench llama-3.1-8b 4 2048 0 2048 )
            done
        done
        ;;
    preab)      # prefill of the earlier build and this one, interleaved
        abench 2 "llama-3.1-8b 4 2048 0 2048" "llama-3.1-8b 16 512 0 4096" \
                 "llama-3.2-1b 4 2048 0 2048"
        ;;
    proffill)   # per-operation GPU time of an 8B 4 x 2048 prefill
        log "profile prefill 8b 4 x 2048"
        PIE_CUDA_PROFILE=1 timeout 200 $R pie bench forward --backend cuda \
            --model random:llama-3.1-8b --batch 4 --prompt-len 2048 --gen 0 \
            --chunk 2048 2>&1 | grep -E "pie profile|prefill:" | tee -a "$OUT/summary.log"
        ;;
    attnab)     # decode attention, the earlier build and this one, twice
        for i in $(seq "${ATTNAB_REPS:-2}"); do
            for b in old new; do
                log "attnab $b"
                run=$R; [ $b = old ] && run=$RO
                PIE_ATTN_NO_SIMT=1 timeout 120 $run bench_cuda_attn 2>&1 \
                    | grep "attn mma" | sed "s/^/$b /" | tee -a "$OUT/summary.log"
            done
        done
        ;;
    attnmma)    # decode attention, tensor-core kernel only
        log attnmma
        PIE_ATTN_NO_SIMT=1 timeout 120 $R bench_cuda_attn 2>&1 | grep "attn mma" \
            | tee -a "$OUT/summary.log"
        ;;
    b16)        # 1B batch-16 decode, three times each way, and its tuning
        PIE_CUDA_TUNE_LOG=1 timeout 200 $R pie bench forward --backend cuda \
            --model random:llama-3.2-1b --batch 16 --prompt-len 64 --gen 2 2>&1 \
            | grep "tune" | tee -a "$OUT/summary.log"
        for i in 1 2 3; do
            TAG="dflt " bench llama-3.2-1b 16 512 48
            PIE_CUDA_NO_GEMV=1 TAG="lt " bench llama-3.2-1b 16 512 48
        done
        ;;
    attnpre)    # causal prefill attention alone (TFLOP/s)
        log attnpre
        PIE_ATTN_PREFILL_ONLY=1 timeout 120 $R bench_cuda_attn 2>&1 | tee -a "$OUT/summary.log"
        ;;
    attnexp)    # decode attention: page size 64, pages in order, 2 blocks/SM
        for v in "PIE_ATTN_PS=64" "PIE_ATTN_SEQ=1" "PIE_CUDA_DEC_BLOCKS=264"; do
            log "attnexp $v"
            env $v PIE_ATTN_NO_SIMT=1 timeout 120 $R bench_cuda_attn 2>&1 \
                | grep "attn mma" | grep -v " B   1 " | tee -a "$OUT/summary.log"
        done
        ;;
    profile)    # per-operation GPU time of decode steps (PIE_CUDA_PROFILE=1)
        for cfg in "llama-3.2-1b 1 512" "llama-3.2-1b 64 512" "llama-3.1-8b 1 512" \
                   "llama-3.1-8b 256 512" "llama-3.1-8b 16 2048"; do
            set -- $cfg
            log "profile $cfg"
            PIE_CUDA_PROFILE=1 timeout 200 $R pie bench forward --backend cuda \
                --model random:$1 --batch $2 --prompt-len $3 --gen 8 2>&1 \
                | grep -E "pie profile|decode:" | tee -a "$OUT/summary.log"
        done
        ;;
    ltsearch)   # cuBLASLt: heuristic candidates vs every configuration
        log ltsearch
        timeout 500 $R bench_lt_search 2>&1 | tee -a "$OUT/summary.log"
        ;;
    thr)        # the throughput decode shapes of the targets
        for cfg in "llama-3.2-1b 64 512 24" "llama-3.2-1b 256 512 24" \
                   "llama-3.1-8b 256 512 16" "llama-3.1-8b 16 2048 24" \
                   "llama-3.1-8b 64 2048 16"; do
            bench $cfg
        done
        ;;
    ncuattn)    # ncu of decode attention: time, stall reasons, memory, occupancy
        m="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.avg,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
        # (no calibration: its kernels would be the ones profiled)
        for cfg in "128,256,512" "128,16,2048" "128,64,2048"; do
            PIE_CUDA_DEC_CALIB=0 PIE_ATTN_ONLY=$cfg timeout 120 ncu --metrics "$m" \
                -k regex:"flash_dec" --launch-skip 6 --launch-count 1 \
                $R bench_cuda_attn > "$OUT/ncu_attn_${cfg//,/_}.txt" 2>&1
            echo "ncu attn $cfg rc=$?" | tee -a "$OUT/summary.log"
        done
        ;;
    kvread)     # the KV reads alone: streaming, access pattern, pieces, math stand-ins
        for a in "2048 8" "128 32"; do
            log "kvread $a"
            timeout 120 $R bench_kv_read $a 2>&1 | tee -a "$OUT/summary.log"
        done
        ;;
    kernels)
        timeout 150 $R test_cuda_kernels > "$OUT/kernels.log" 2>&1
        echo "kernels rc=$?" | tee -a "$OUT/summary.log"; tail -4 "$OUT/kernels.log"
        # the mma.sync prefill kernel that wgmma replaces at head dim 128
        PIE_CUDA_NO_WGMMA=1 timeout 150 $R test_cuda_kernels > "$OUT/kernels-nowg.log" 2>&1
        echo "kernels (PIE_CUDA_NO_WGMMA) rc=$?" | tee -a "$OUT/summary.log"
        # wgmm.cu's tests on clusters of 2
        PIE_KTEST_WGMM=1 PIE_CUDA_WGMM_CL=2 timeout 150 $R test_cuda_kernels > "$OUT/kernels-wgcl2.log" 2>&1
        echo "kernels (wgmm, PIE_CUDA_WGMM_CL=2) rc=$?" | tee -a "$OUT/summary.log"
        ;;
    tune)   # the timed matmul choices of both shapes (every bucket of m)
        for m in llama-3.2-1b llama-3.1-8b; do
            PIE_CUDA_TUNE_LOG=1 timeout 200 $R pie bench forward --backend cuda \
                --model random:$m --batch 1 --prompt-len 64 --gen 2 2>&1 \
                | grep "tune" | tee -a "$OUT/summary.log"
        done
        ;;
    pre)    # prefill throughput of both shapes (twice each)
        for cfg in "llama-3.1-8b 4 2048 0 2048" "llama-3.1-8b 16 512 0 4096" \
                   "llama-3.2-1b 4 2048 0 2048"; do
            bench $cfg; bench $cfg
        done
        ;;
    splits) # decode steps at PIE_CUDA_SPLIT_BLOCKS = 2 (default), 4, 8, 16
        for cfg in "llama-3.2-1b 64 512 24" "llama-3.2-1b 256 512 24" \
                   "llama-3.1-8b 64 512 16" "llama-3.1-8b 256 512 16" \
                   "llama-3.1-8b 16 2048 16"; do
            for sb in 2 4 8 16; do
                PIE_CUDA_SPLIT_BLOCKS=$sb TAG="sb$sb " bench $cfg
            done
        done
        ;;
    b1)     # batch-1 decode of both shapes, gemv.cu (default) and cuBLASLt only
        for cfg in "llama-3.2-1b 1 512 48" "llama-3.1-8b 1 512 24" \
                   "llama-3.2-1b 16 512 48" "llama-3.1-8b 16 512 24"; do
            TAG="dflt " bench $cfg
            PIE_CUDA_NO_GEMV=1 TAG="lt " bench $cfg
        done
        ;;
    pdl)    # PDL for gemv.cu only (default) / for all / off; cuBLASLt only
        log "pdl: default, PIE_CUDA_PDL_ALL=1, PIE_CUDA_NO_PDL=1, PIE_CUDA_NO_GEMV=1"
        for cfg in "llama-3.2-1b 1 512 48" "llama-3.2-1b 16 512 48" \
                   "llama-3.1-8b 1 512 24" "llama-3.1-8b 64 512 24"; do
            TAG="dflt " bench $cfg
            PIE_CUDA_PDL_ALL=1 TAG="pdlall " bench $cfg
            PIE_CUDA_NO_PDL=1 TAG="nopdl " bench $cfg
            PIE_CUDA_NO_GEMV=1 TAG="lt " bench $cfg
        done
        ;;
    gemv)   # gemv.cu against cuBLASLt only, and without PDL, same binary
        log "gemv: default, PIE_CUDA_NO_GEMV=1 (lt), PIE_CUDA_NO_PDL=1"
        for m in llama-3.2-1b llama-3.1-8b; do
            PIE_CUDA_TUNE_LOG=1 timeout 200 $R pie bench forward --backend cuda \
                --model random:$m --batch 1 --prompt-len 64 --gen 2 2>&1 \
                | grep "tune" | tee -a "$OUT/summary.log"
        done
        for cfg in "llama-3.2-1b 1 512 48" "llama-3.2-1b 1 2048 48" \
                   "llama-3.2-1b 8 512 48" "llama-3.2-1b 16 512 48" \
                   "llama-3.1-8b 1 512 24" "llama-3.1-8b 1 2048 24" \
                   "llama-3.1-8b 8 512 24"; do
            TAG="gemv " bench $cfg
            PIE_CUDA_NO_GEMV=1 TAG="lt " bench $cfg
            PIE_CUDA_NO_PDL=1 TAG="nopdl " bench $cfg
        done
        ;;
    profpre)    # per-kernel time of one 4096-token prefill forward, old and new
        m="gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active"
        for v in old new; do
            run=$R; [ $v = old ] && run=$RO
            timeout 200 ncu --csv --clock-control none --metrics $m \
                --launch-skip 150 --launch-count 260 $run pie bench forward \
                --backend cuda --model random:llama-3.2-1b --batch 2 \
                --prompt-len 2048 --gen 0 --chunk 4096 \
                > "$OUT/ncu_pre_$v.csv" 2> /tmp/pie/ncu.err
            echo "ncu prefill $v rc=$?" | tee -a "$OUT/summary.log"
        done
        ;;
    gap)    # the control layer's time between fires, as a GPU would see it
        for i in 1 2 3; do
            timeout 120 $R bench_control gap 256 2>&1 | grep beyond \
                | tee -a "$OUT/summary.log"
        done
        ;;
    gen)    # inferlet/native ratio through the control layer (issue point 6)
        log "gen: pie bench generate, random:llama-3.2-1b, 128 tokens, median of 3"
        PIE="$R pie" BACKEND=cuda timeout 500 bash scripts/bench-ratio.sh \
            random:llama-3.2-1b 128 3 1 64 256 2>&1 | tee -a "$OUT/summary.log"
        ;;
    nomerge)    # decode attention with its merge kernel, and without (timing)
        for v in "" "PIE_ATTN_NO_MERGE=1"; do
            log "nomerge ${v:-with merge}"
            env $v PIE_ATTN_NO_SIMT=1 timeout 120 $R bench_cuda_attn 2>&1 \
                | grep "attn mma" | grep -v " B   1 " | tee -a "$OUT/summary.log"
        done
        ;;
    wholeab)    # decode attention and steps: cut plan only, then the default
        for cfg in ${WHOLE_CFGS:-128,16,1024 128,16,1536 128,16,2048 128,16,4096 128,16,8192 128,64,2048 128,256,512 64,64,512 64,32,2048 64,256,512}; do
            for v in 0 "" 2; do
                echo -n "whole=${v:-default} " | tee -a "$OUT/summary.log"
                PIE_CUDA_DEC_WHOLE=$v PIE_ATTN_ONLY=$cfg timeout 60 $R bench_cuda_attn \
                    2>&1 | tee -a "$OUT/summary.log"
            done
        done
        for i in $(seq "${WHOLE_REPS:-3}"); do
            IFS=, read -ra steps <<< "${WHOLE_STEPS:-llama-3.1-8b 16 2048 24,llama-3.1-8b 16 4096 16}"
            for cfg in "${steps[@]}"; do
                PIE_CUDA_DEC_WHOLE=0 TAG="cut " bench $cfg
                TAG="default " bench $cfg
                PIE_CUDA_DEC_WHOLE=2 TAG="two-per-SM " bench $cfg
            done
        done
        ;;
    trace)      # kernel timeline of decode steps (CUPTI): cut plan, default, two per SM
        IFS=, read -ra tcfgs <<< "${TRACE_CFGS:-llama-3.1-8b 256 512 8}"
        for cfg in "${tcfgs[@]}"; do
            set -- $cfg
            for v in ${TRACE_WHOLE:-0 "" 2}; do
                log "trace $cfg whole=${v:-default}"
                PIE_CUDA_DEC_WHOLE=$v PIE_CUDA_TRACE="$OUT/trace-$1-$2-$3-w${v:-d}.tsv" \
                    timeout 200 $R pie bench forward --backend cuda --model random:$1 \
                    --batch $2 --prompt-len $3 --gen $4 2>&1 \
                    | grep -E "pie trace|decode:" | tee -a "$OUT/summary.log"
            done
        done
        ;;
    mega)       # batch-1 decode: one kernel (PIE_CUDA_MEGA=1) vs the default, interleaved
        for i in $(seq "${MEGA_REPS:-2}"); do
            for cfg in "llama-3.2-1b 1 512 48" "llama-3.2-1b 1 2048 48" \
                       "llama-3.1-8b 1 512 24" "llama-3.1-8b 1 2048 24"; do
                PIE_CUDA_MEGA=1 TAG="mega " bench $cfg
                TAG="per-op " bench $cfg
            done
        done
        ;;
    steps)      # where decode steps' wall time goes (PIE_CUDA_STEPS=1)
        for cfg in "llama-3.2-1b 1 512 48" "llama-3.1-8b 1 512 24" \
                   "llama-3.2-1b 64 512 48" "llama-3.1-8b 256 512 16"; do
            PIE_CUDA_STEPS=1 bench $cfg
        done
        ;;
    decblk)     # decode attention at several persistent grid sizes, no merge
        for cfg in ${DECBLK_CFGS:-128,16,2048 128,16,8192 128,64,2048 128,256,512}; do
            for nb in ${DECBLK_NB:-128 132 256 264 396}; do
                for v in "" "PIE_ATTN_NO_MERGE=1"; do
                    echo -n "nb $nb ${v:-merge} " | tee -a "$OUT/summary.log"
                    env $v PIE_CUDA_DEC_BLOCKS=$nb PIE_ATTN_ONLY=$cfg timeout 60 \
                        $R bench_cuda_attn 2>&1 | tee -a "$OUT/summary.log"
                done
            done
        done
        ;;
    genab)  # gen with the earlier build, then with this one
        for b in old new; do
            run=$R; [ $b = old ] && run=$RO
            log "genab $b"
            PIE="$run pie" BACKEND=cuda timeout 280 bash scripts/bench-ratio.sh \
                random:llama-3.2-1b 128 3 1 64 256 2>&1 | tee -a "$OUT/summary.log"
        done
        ;;
    graphs)
        log "graphs (each pair: with graphs, then PIE_CUDA_NO_GRAPH=1)"
        for B in 1 16 64 256; do
            bench llama-3.2-1b $B 2048 24
            PIE_CUDA_NO_GRAPH=1 bench llama-3.2-1b $B 2048 24
        done
        for B in 1 64; do
            bench llama-3.1-8b $B 2048 24
            PIE_CUDA_NO_GRAPH=1 bench llama-3.1-8b $B 2048 24
        done
        ;;
    nsys)   # per-kernel GPU time (nsys, graph nodes traced) of decode steps
        if ! command -v nsys > /dev/null; then
            echo "nsys: not installed on this machine (ncu is: see prof)" \
                | tee -a "$OUT/summary.log"
            continue
        fi
        for cfg in "llama-3.2-1b 64 512" "llama-3.1-8b 1 512" "llama-3.2-1b 16 2048"; do
            set -- $cfg
            f=kern_$1_b$2_l$3
            timeout 200 nsys profile -o /tmp/pie/$f --force-overwrite true \
                --cuda-graph-trace=node $R pie bench forward --backend cuda \
                --model random:$1 --batch $2 --prompt-len $3 --gen 32 \
                > "$OUT/nsys.log" 2>&1
            nsys stats --report cuda_gpu_kern_sum --format csv \
                /tmp/pie/$f.nsys-rep > "$OUT/$f.csv" 2>> "$OUT/nsys.log"
            echo "nsys $cfg rc=$?" | tee -a "$OUT/summary.log"
        done
        ;;
    prof)
        log prof
        which nsys ncu 2>&1 | tee -a "$OUT/summary.log"
        if command -v nsys > /dev/null; then
            timeout 240 nsys profile -o /tmp/pie/dec --force-overwrite true \
                --cuda-graph-trace=node $R pie bench forward --backend cuda \
                --model random:llama-3.2-1b --batch 1 --prompt-len 512 \
                --gen 128 > "$OUT/nsys.log" 2>&1
            nsys stats --report cuda_gpu_kern_sum --format csv \
                /tmp/pie/dec.nsys-rep > "$OUT/kern_1b_b1.csv" 2>> "$OUT/nsys.log"
            head -25 "$OUT/kern_1b_b1.csv" | cut -c1-220 | tee -a "$OUT/summary.log"
        fi
        if command -v ncu > /dev/null; then
            # one decode step's kernels (after the prefill and warm-up steps),
            # real clocks, per-kernel time and DRAM traffic as CSV
            m="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active"
            cfgs=("1 2048 0 900" "64 2048 4096 5500" "3.1 1 64 0 1500")
            for cfg in "${cfgs[@]}"; do
                set -- $cfg
                mdl=llama-3.2-1b
                if [ "$1" = 3.1 ]; then mdl=llama-3.1-8b; shift; fi
                B=$1 L=$2 skip=$4
                timeout 200 ncu --csv --clock-control none --cache-control none \
                    --metrics $m --launch-skip $skip --launch-count 600 \
                    $R pie bench forward --backend cuda --model random:$mdl \
                    --batch $B --prompt-len $L --gen 6 \
                    > "$OUT/ncu_${mdl}_b${B}_l$L.csv" 2> /tmp/pie/ncu.err
                echo "ncu $mdl B=$B L=$L rc=$?" | tee -a "$OUT/summary.log"
                tail -3 /tmp/pie/ncu.err >> "$OUT/summary.log"
            done
        fi
        ;;
    esac
done
log done
