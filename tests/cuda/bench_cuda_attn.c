/*
 * bench_cuda_attn.c — achieved bandwidth of paged decode attention (one
 * layer, one new token per request, contexts of L slots over shuffled pages
 * of 16), for the Llama-3.2-1B (32/8 heads, hd 64) and 3.1-8B (hd 128)
 * head shapes. Prints µs per call and TB/s counting K and V bytes read
 * once. The split plan mirrors cuda_backend.c (about 2 blocks per SM).
 */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_kernels.h"

#define CU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

static void run(int hd, int B, int L)
{
    int nh = 32, nkv = 8, ps = 16, G = nh / nkv, sm = 132;
    int per = (L + ps - 1) / ps, np = B * per;
    pie_cuda_kv kv = { NULL, 1, nkv, ps, hd };
    size_t pool = (size_t)pie_cuda_kv_page_elems(&kv) * np;
    CU(cudaMalloc((void **)&kv.pool, pool * 2));
    CU(cudaMemset(kv.pool, 0x3c, pool * 2));    /* 1.15-ish bf16, not zero */
    int32_t *pages = malloc(4 * np), *slot = malloc(4 * B), *req = malloc(4 * B);
    int32_t *ind = malloc(4 * (B + 1)), *len = malloc(4 * B), *pos = malloc(4 * B);
    for (int i = 0; i < np; i++) pages[i] = i;
    for (int i = np - 1; i > 0; i--) {
        int j = rand() % (i + 1), t = pages[i];
        pages[i] = pages[j]; pages[j] = t;
    }
    for (int r = 0; r < B; r++) {
        slot[r] = L - 1; req[r] = r; ind[r] = r * per; len[r] = L; pos[r] = L - 1;
    }
    ind[B] = np;
    int want = (2 * sm + B * nkv - 1) / (B * nkv);
    if (want > 32) want = 32;
    int opt = (L + 127) / 128, need = (L + PIE_CUDA_ATTN_CHUNK - 1) / PIE_CUDA_ATTN_CHUNK;
    int ns = want < opt ? want : opt;
    if (ns < need) ns = need;
    int ni = 0, nm = 0, parts = 0;
    pie_cuda_attn_item *it = malloc(sizeof *it * (size_t)B * nkv * ns);
    pie_cuda_merge_item *mi = malloc(sizeof *mi * (size_t)B * nkv + 1);
    for (int r = 0; r < B; r++)
        for (int h = 0; h < nkv; h++) {
            if (ns > 1) mi[nm++] = (pie_cuda_merge_item){ r, 1, h, ns, parts, {0} };
            for (int s = 0; s < ns; s++)
                it[ni++] = (pie_cuda_attn_item){ r, r, 1, h, L * s / ns,
                    L * (s + 1) / ns, ns > 1 ? parts + s * G : -1, 0 };
            if (ns > 1) parts += ns * G;
        }
    void *d[9];
    size_t sz[9] = { 4 * (size_t)np, 4 * (size_t)B, 4 * (size_t)B, 4 * (size_t)(B + 1),
                     4 * (size_t)B, 4 * (size_t)B, sizeof *it * ni, sizeof *mi * (nm + 1),
                     0 };
    const void *h[8] = { pages, slot, req, ind, len, pos, it, mi };
    for (int i = 0; i < 8; i++) {
        CU(cudaMalloc(&d[i], sz[i] + 16));
        CU(cudaMemcpy(d[i], h[i], sz[i], cudaMemcpyHostToDevice));
    }
    pie_cuda_tokmeta tm = { d[1], d[2], d[5], d[3], d[4], d[0], NULL, NULL };
    float *q, *po, *pml;
    uint16_t *out;
    CU(cudaMalloc((void **)&q, 4 * (size_t)B * nh * hd));
    CU(cudaMemset(q, 0, 4 * (size_t)B * nh * hd));
    CU(cudaMalloc((void **)&out, 2 * (size_t)B * nh * hd));
    CU(cudaMalloc((void **)&po, 4 * (size_t)(parts + 1) * hd));
    CU(cudaMalloc((void **)&pml, 8 * (size_t)(parts + 1)));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    int iters = 20;
    for (int w = 0; w < 3; w++) {
        pie__cuda_attention(out, po, pml, q, d[6], ni, &tm, &kv, 0, nh, (L + ns - 1) / ns + 1, 0);
        pie__cuda_attn_merge(out, po, pml, d[7], nm, nh, nkv, hd, 0);
    }
    CU(cudaEventRecord(e0, 0));
    for (int w = 0; w < iters; w++) {
        pie__cuda_attention(out, po, pml, q, d[6], ni, &tm, &kv, 0, nh, (L + ns - 1) / ns + 1, 0);
        pie__cuda_attn_merge(out, po, pml, d[7], nm, nh, nkv, hd, 0);
    }
    CU(cudaEventRecord(e1, 0));
    CU(cudaEventSynchronize(e1));
    CU(cudaGetLastError());
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    double us = ms * 1e3 / iters;
    double bytes = (double)B * L * nkv * hd * 2 * 2;
    printf("attn hd %3d  B %3d  ctx %5d  splits %2d  %8.1f us  %6.2f TB/s\n",
           hd, B, L, ns, us, bytes / (us * 1e-6) / 1e12);
    for (int i = 0; i < 8; i++) cudaFree(d[i]);
    cudaFree(kv.pool); cudaFree(q); cudaFree(out); cudaFree(po); cudaFree(pml);
    free(pages); free(slot); free(req); free(ind); free(len); free(pos);
    free(it); free(mi);
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        fprintf(stderr, "no CUDA GPU\n");
        return 77;
    }
    int hds[2] = { 64, 128 }, Bs[4] = { 1, 16, 64, 256 }, Ls[3] = { 512, 2048, 8192 };
    for (int a = 0; a < 2; a++)
        for (int l = 0; l < 3; l++)
            for (int b = 0; b < 4; b++) run(hds[a], Bs[b], Ls[l]);
    return 0;
}
