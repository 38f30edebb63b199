/*
 * bench_cuda_attn.c — achieved bandwidth of paged decode attention (one
 * layer, one new token per request, contexts of L slots over shuffled pages
 * of 16, random K, V and Q), for the Llama-3.2-1B (32/8 heads, hd 64) and
 * 3.1-8B (hd 128) head shapes. Prints µs per call (launched one by one,
 * and replayed as one CUDA graph) and TB/s counting K and V bytes read
 * once. The plans mirror cuda_backend.c: splits for about 2 blocks per SM
 * on the CUDA-core kernel ("simt"), the balanced persistent grid of
 * pie_cuda_dec_plan on the tensor-core decode kernel ("mma", resident
 * blocks x SMs, or PIE_CUDA_DEC_BLOCKS), or its whole-item plan of 1, 2
 * or 4 blocks per SM where that pays ("whole"), or at small batch its
 * cluster plan (items over clusters of blocks, "clust"); then causal prefill
 * attention of one prompt on the tensor-core kernel in TFLOP/s (4 * hd
 * flops per attended pair).
 */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_kernels.h"

#define CU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

/* The one-per-SM plan's bound on item length, timed at the start as the
 * backend does (pie_cuda_dec_calibrate) */
static int64_t max1 = PIE_CUDA_DEC_WHOLE_MAX;

static void run(int hd, int B, int L, int mma)
{
    int nh = 32, nkv = 8, ps = 16, G = nh / nkv, sm = 132;
    const char *pse = getenv("PIE_ATTN_PS");     /* experiments */
    if (pse && atoi(pse) > 0) ps = atoi(pse);
    CU(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
    int per = (L + ps - 1) / ps, np = B * per;
    /* A pool of nl layers, as a model's (pages nl times farther apart);
     * call i reads layer i % nl, so that no call finds the KV of the one
     * before in L2 (50 MB): a step reads each layer once. nl: enough for
     * 256 MB between reuses (PIE_ATTN_LAYERS=N: N; =1 re-reads one layer,
     * as before round 11); at least nl calls are timed. */
    double layer_mb = (double)B * L * nkv * hd * 2 * 2 / 1e6;
    int nl = layer_mb >= 256 ? 1 : (int)(256 / layer_mb) + 1;
    const char *lye = getenv("PIE_ATTN_LAYERS");
    if (lye && atoi(lye) > 0) nl = atoi(lye);
    pie_cuda_kv kv = { NULL, nl, nkv, ps, hd };
    size_t pool = (size_t)pie_cuda_kv_page_elems(&kv) * np;
    CU(cudaMalloc((void **)&kv.pool, pool * 2));
    /* random K, V and Q, so that the online softmax rescales as in a real
     * step (PIE_ATTN_CONST=1: constant K and V, Q zero, as before round 11:
     * every score equal, the cheapest math) */
    const char *ce = getenv("PIE_ATTN_CONST");
    int cnst = ce && atoi(ce) > 0;
    if (cnst) CU(cudaMemset(kv.pool, 0x3c, pool * 2));
    else pie__cuda_fill_bf16(kv.pool, (int64_t)pool, 11, 1.0f, 0, 0);
    int32_t *pages = malloc(4 * np), *slot = malloc(4 * B), *req = malloc(4 * B);
    int32_t *ind = malloc(4 * (B + 1)), *len = malloc(4 * B), *pos = malloc(4 * B);
    for (int i = 0; i < np; i++) pages[i] = i;
    for (int i = np - 1; i > 0 && !getenv("PIE_ATTN_SEQ"); i--) {
        int j = rand() % (i + 1), t = pages[i];
        pages[i] = pages[j]; pages[j] = t;
    }
    for (int r = 0; r < B; r++) {
        slot[r] = L - 1; req[r] = r; ind[r] = r * per; len[r] = L; pos[r] = L - 1;
    }
    ind[B] = np;
    const char *e = getenv("PIE_CUDA_SPLIT_BLOCKS");   /* as the backend */
    int bps = e && atoi(e) > 0 ? atoi(e) : 2;
    int want = (bps * sm + B * nkv - 1) / (B * nkv);
    if (want > 32) want = 32;
    int opt = (L + 127) / 128, need = (L + PIE_CUDA_ATTN_CHUNK - 1) / PIE_CUDA_ATTN_CHUNK;
    int ns = want < opt ? want : opt;
    if (ns < need) ns = need;
    if (mma) ns = 1;                    /* the decode plan cuts items */
    const char *db = getenv("PIE_CUDA_DEC_BLOCKS");
    int nb = db && atoi(db) > 0 ? atoi(db)
                                : pie__cuda_attention_dec_occupancy(hd, 0) * sm;
    int ni = 0, nm = 0, npc = 0, parts = 0;
    pie_cuda_attn_item *it = malloc(sizeof *it * (size_t)B * nkv * ns);
    pie_cuda_merge_item *mi = calloc((size_t)B * nkv + nb + 1, sizeof *mi);
    for (int r = 0; r < B; r++)
        for (int h = 0; h < nkv; h++) {
            if (ns > 1) mi[nm++] = (pie_cuda_merge_item){ r, 1, h, ns, parts, {0} };
            for (int s = 0; s < ns; s++)
                it[ni++] = (pie_cuda_attn_item){ r, r, 1, h, L * s / ns,
                    L * (s + 1) / ns, ns > 1 ? parts + s * G : -1, mma };
            if (ns > 1) parts += ns * G;
        }
    int nbw = nb > 8 * sm ? nb : 8 * sm;    /* whole plans: up to 8 an SM */
    pie_cuda_attn_item *pc = malloc(sizeof *pc * ((size_t)ni + nb));
    int32_t *bst = malloc(4 * ((size_t)nbw + 1));
    /* as the backend: the whole-item plan where it pays (1, 2 or 4 blocks
     * per SM, no merge; PIE_CUDA_DEC_WHOLE=0 never, =k always) */
    int whole = 0, force = pie_cuda_dec_whole_switch();
    /* as the backend: the cluster plan at small batch (no merge kernel;
     * PIE_CUDA_DEC_CLUSTER=0 never, =C always), unless a whole-item plan
     * is forced */
    int clus = 0, cmax = mma ? pie__cuda_attention_dec_cluster_max(hd, 0) : 0;
    int cforce = pie_cuda_dec_cluster_switch(), cpad = 0;
    if (mma && force <= 0)
        clus = pie_cuda_dec_cluster_size(it, ni, sm, nb, cmax, cforce, &cpad);
    if (mma && !clus && force >= 0) {
        whole = pie_cuda_dec_try_whole(it, ni, sm,
                                       pie__cuda_attention_dec_occupancy(hd, 1),
                                       hd, force, max1, pc, bst);
        if (whole < 0) whole = 0;
        if (whole) { nb = whole * sm; npc = ni; nm = 0; }
    }
    if (mma && !clus && !whole && force <= 0)     /* batches of about 5-16 */
        clus = pie_cuda_dec_cluster_mid(it, ni, sm, nb, hd, cmax, cforce, &cpad);
    int pad = pie_cuda_dec_cluster_pad_switch();
    if (clus && pad >= 0) cpad = pad;
    if (clus) {
        int mp[4] = { 0 };
        for (int k = 1; k <= 3; k++)
            mp[k] = pie__cuda_attention_dec_cluster_max(hd, k);
        cpad = pie_cuda_dec_cluster_pad_fit(clus, cpad, mp);
    }
    if (clus) {
        pie_cuda_dec_plan_cluster(it, ni, clus, pc);
        npc = ni * clus;
        nm = 0;
    } else if (mma && !whole) {
        parts = (int)pie_cuda_dec_plan(it, ni, G, nb, 2, 0, pc, &npc, bst, mi, &nm);
        nm = nb;                /* as the backend: a fixed-size merge list */
    }
    void *d[10];
    size_t sz[10] = { 4 * (size_t)np, 4 * (size_t)B, 4 * (size_t)B, 4 * (size_t)(B + 1),
                      4 * (size_t)B, 4 * (size_t)B, sizeof *it * ni, sizeof *mi * (nm + 1),
                      sizeof *pc * (npc + 1), 4 * ((size_t)nb + 1) };
    const void *h[10] = { pages, slot, req, ind, len, pos, it, mi, pc, bst };
    for (int i = 0; i < 10; i++) {
        CU(cudaMalloc(&d[i], sz[i] + 16));
        CU(cudaMemcpy(d[i], h[i], sz[i], cudaMemcpyHostToDevice));
    }
    pie_cuda_tokmeta tm = { d[1], d[2], d[5], d[3], d[4], d[0], NULL, NULL };
    float *q, *po, *pml;
    uint16_t *out;
    CU(cudaMalloc((void **)&q, 4 * (size_t)B * nh * hd));
    CU(cudaMemset(q, 0, 4 * (size_t)B * nh * hd));
    if (!cnst) {
        float *qh = malloc(4 * (size_t)B * nh * hd);
        for (size_t i = 0; i < (size_t)B * nh * hd; i++)
            qh[i] = (float)rand() / RAND_MAX * 2 - 1;
        CU(cudaMemcpy(q, qh, 4 * (size_t)B * nh * hd, cudaMemcpyHostToDevice));
        free(qh);
    }
    CU(cudaMalloc((void **)&out, 2 * (size_t)B * nh * hd));
    CU(cudaMalloc((void **)&po, 4 * (size_t)(parts + 1) * hd));
    CU(cudaMalloc((void **)&pml, 8 * (size_t)(parts + 1)));
    cudaEvent_t e0, e1;
    cudaStream_t st;
    cudaGraph_t gr;
    cudaGraphExec_t ge;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CU(cudaDeviceSynchronize());        /* the fills, on the legacy stream */
    int iters = nl > 20 ? nl : 20;
    /* PIE_ATTN_NO_MERGE=1 (an experiment: wrong output): attention alone */
    int merge = !getenv("PIE_ATTN_NO_MERGE");
    /* us per call: launched one by one on a stream, then replayed as one
     * CUDA graph of iters calls (as decode steps run them: no launch gaps) */
    double us[2];
    for (int g = 0; g < 2; g++) {
        if (g) CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int w = 0; w < (g ? iters : 3 + iters); w++) {
            if (!g && w == 3) CU(cudaEventRecord(e0, st));
            if (clus) {
                pie__cuda_attention_dec_cluster(out, q, d[8], npc, clus, cpad,
                                                &tm, &kv, w % nl, nh, st);
            } else if (mma) {
                pie__cuda_attention_dec(out, po, pml, q, d[8], d[9], nb, &tm, &kv,
                                        w % nl, nh, whole, st);
            } else {
                pie__cuda_attention(out, po, pml, q, d[6], ni, &tm, &kv, w % nl, nh,
                                    (L + ns - 1) / ns + 1, st);
            }
            if (merge && !whole && !clus)
                pie__cuda_attn_merge(out, po, pml, d[7], nm, nh, nkv, hd, st);
        }
        if (g) {
            CU(cudaStreamEndCapture(st, &gr));
            CU(cudaGraphInstantiate(&ge, gr, 0));
            CU(cudaGraphLaunch(ge, st));            /* warm-up */
            CU(cudaEventRecord(e0, st));
            CU(cudaGraphLaunch(ge, st));
        }
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        CU(cudaGetLastError());
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        us[g] = ms * 1e3 / iters;
        if (g) { cudaGraphExecDestroy(ge); cudaGraphDestroy(gr); }
    }
    cudaStreamDestroy(st);
    double tb = (double)B * L * nkv * hd * 2 * 2 / 1e6;   /* MB -> TB/s per us */
    printf("attn %s hd %3d  B %3d  ctx %5d  %s %4d  %8.1f us  %6.2f TB/s"
           "  graph %8.1f us  %6.2f TB/s\n",
           mma ? "mma " : "simt", hd, B, L,
           clus ? "clust " : whole ? "whole " : mma ? "blocks" : "splits",
           clus ? npc : mma ? nb : ns, us[0], tb / us[0], us[1], tb / us[1]);
    for (int i = 0; i < 10; i++) cudaFree(d[i]);
    cudaFree(kv.pool); cudaFree(q); cudaFree(out); cudaFree(po); cudaFree(pml);
    free(pages); free(slot); free(req); free(ind); free(len); free(pos);
    free(it); free(mi); free(pc); free(bst);
}

/* Causal prefill of one L-token prompt (empty cache) on the tensor-core
 * kernel: PIE_CUDA_FLASH_ROWS-token tiles x 32 heads. */
static void run_prefill(int hd, int L)
{
    int nh = 32, nkv = 8, ps = 16, np = (L + ps - 1) / ps, T = PIE_CUDA_FLASH_ROWS;
    pie_cuda_kv kv = { NULL, 1, nkv, ps, hd };
    size_t pool = (size_t)pie_cuda_kv_page_elems(&kv) * np;
    CU(cudaMalloc((void **)&kv.pool, pool * 2));
    /* random K, V and Q: the row maxima move as in a real prompt (with
     * equal scores the online softmax never rescales) */
    pie__cuda_fill_bf16(kv.pool, (int64_t)pool, 7, 1.0f, 0, 0);
    int32_t *pages = malloc(4 * np), *slot = malloc(4 * L), *req = malloc(4 * L);
    int32_t ind[2] = { 0, np }, len[1] = { L };
    for (int i = 0; i < np; i++) pages[i] = i;
    for (int t = 0; t < L; t++) { slot[t] = t; req[t] = 0; }
    int ni = 0;
    pie_cuda_attn_item *it = malloc(sizeof *it * (size_t)((L + T - 1) / T) * nh);
    for (int i = (L - 1) / T * T; i >= 0; i -= T) {  /* longest first, as
                                                        * the backend */
        int nt = L - i < T ? L - i : T;
        for (int h = 0; h < nh; h++)
            it[ni++] = (pie_cuda_attn_item){ 0, i, nt, h, 0, i + nt, -1, 0 };
    }
    void *d[6];
    size_t sz[6] = { 4 * (size_t)np, 4 * (size_t)L, 4 * (size_t)L, 8, 4,
                     sizeof *it * ni };
    const void *h[6] = { pages, slot, req, ind, len, it };
    for (int i = 0; i < 6; i++) {
        CU(cudaMalloc(&d[i], sz[i] + 16));
        CU(cudaMemcpy(d[i], h[i], sz[i], cudaMemcpyHostToDevice));
    }
    pie_cuda_tokmeta tm = { d[1], d[2], d[1], d[3], d[4], d[0], NULL, NULL };
    float *q;
    uint16_t *out;
    CU(cudaMalloc((void **)&q, 4 * (size_t)L * nh * hd));
    float *qh = malloc(4 * (size_t)L * nh * hd);
    for (size_t i = 0; i < (size_t)L * nh * hd; i++) qh[i] = (float)rand() / RAND_MAX * 2 - 1;
    CU(cudaMemcpy(q, qh, 4 * (size_t)L * nh * hd, cudaMemcpyHostToDevice));
    free(qh);
    CU(cudaMalloc((void **)&out, 2 * (size_t)L * nh * hd));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    int iters = 10;
    for (int w = 0; w < 2 + iters; w++) {
        if (w == 2) CU(cudaEventRecord(e0, 0));
        pie__cuda_attention_flash(out, NULL, NULL, q, d[5], ni, &tm, &kv, 0, nh, 0);
    }
    CU(cudaEventRecord(e1, 0));
    CU(cudaEventSynchronize(e1));
    CU(cudaGetLastError());
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    double us = ms * 1e3 / iters;
    double flops = 4.0 * hd * nh * ((double)L * (L + 1) / 2);
    printf("prefill mma hd %3d  L %5d  %8.1f us  %6.1f TFLOP/s\n", hd, L, us,
           flops / (us * 1e-6) / 1e12);
    for (int i = 0; i < 6; i++) cudaFree(d[i]);
    cudaFree(kv.pool); cudaFree(q); cudaFree(out);
    free(pages); free(slot); free(req); free(it);
}

/* max1 for head dim 128 (8 kv heads, 32 query heads, pages of 16), timed
 * on a pool of its own, as the backend times it on its KV pool. */
static void calibrate(void)
{
    int sm = 132;
    CU(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
    pie_cuda_kv kv = { NULL, 1, 8, 16, 128 };
    int64_t np = (int64_t)(sm / 8) * (8192 / 16);
    CU(cudaMalloc((void **)&kv.pool, (size_t)pie_cuda_kv_page_elems(&kv) * np * 2));
    double tw, tc;
    max1 = pie_cuda_dec_calibrate(&kv, np, 32, sm,
                                  pie__cuda_attention_dec_occupancy(128, 0) * sm,
                                  0, &tw, &tc);
    printf("calibrated: hd 128 B %d ctx 8192, one block an SM %.1f us, cut "
           "plan %.1f us: long items %s\n", sm / 8, tw, tc,
           max1 > PIE_CUDA_DEC_WHOLE_MAX ? "on one an SM" : "cut");
    CU(cudaFree(kv.pool));
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        fprintf(stderr, "no CUDA GPU\n");
        return 77;
    }
    if (!getenv("PIE_CUDA_DEC_CALIB") || *getenv("PIE_CUDA_DEC_CALIB") != '0')
        calibrate();
    /* PIE_ATTN_ONLY="hd,B,ctx": that decode shape alone, on the tensor-core
     * kernel (for profilers) */
    const char *only = getenv("PIE_ATTN_ONLY");
    int ohd, oB, oL;
    if (only && sscanf(only, "%d,%d,%d", &ohd, &oB, &oL) == 3) {
        run(ohd, oB, oL, 1);
        return 0;
    }
    int hds[2] = { 64, 128 }, Bs[4] = { 1, 16, 64, 256 }, Ls[3] = { 512, 2048, 8192 };
    int simt = !getenv("PIE_ATTN_NO_SIMT");
    for (int a = 0; a < 2 && !getenv("PIE_ATTN_PREFILL_ONLY"); a++)
        for (int l = 0; l < 3; l++)
            for (int b = 0; b < 4; b++)
                for (int m = !simt; m < 2; m++) run(hds[a], Bs[b], Ls[l], m);
    for (int a = 0; a < 2; a++) {
        run_prefill(hds[a], 2048);
        run_prefill(hds[a], 8192);
    }
    return 0;
}
