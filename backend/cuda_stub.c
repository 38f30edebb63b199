/* cuda_stub.c — stands in for the CUDA backend in builds without CUDA. */
#include "backend/backend.h"
#include "common/pie_err.h"

int pie_backend_cuda_available(void) { return 0; }

int pie_backend_cuda_create(const pie_model *m, const pie_backend_opts *o,
                            pie_backend **out)
{
    *out = NULL;
    return pie_err_set(PIE_EUNSUPPORTED,
                       "this pie was built without CUDA (configure with "
                       "-DPIE_CUDA=ON on a machine with nvcc)");
}

void pie_backend_cuda_graphs(const pie_backend *b, int64_t *captured,
                             int64_t *replayed)
{
    (void)b;
    *captured = *replayed = 0;
}

int64_t pie_backend_cuda_gemv_calls(const pie_backend *b)
{
    (void)b;
    return 0;
}

int64_t pie_backend_cuda_wgmm_calls(const pie_backend *b)
{
    (void)b;
    return 0;
}

int64_t pie_backend_cuda_mega_steps(const pie_backend *b)
{
    (void)b;
    return 0;
}

int64_t pie_backend_cuda_replans(const pie_backend *b)
{
    (void)b;
    return 0;
}
