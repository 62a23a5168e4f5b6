/* pddnet fused head: the entry points called through ctypes (pddnet.backends.native), the
 * choice of kernel set at run time, session scratch and the thread helper.  Plain C and
 * pthreads; no Python API. */
#define _POSIX_C_SOURCE 200112L
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pdd_head.h"

int pdd_abi_version(void) { return PDD_ABI_VERSION; }

/* 1 when the kernel set was compiled in and this CPU runs it */
int pdd_isa_available(int isa)
{
    switch (isa) {
    case PDD_ISA_PORTABLE:
        return 1;
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    case PDD_ISA_SSE2:
#if defined(__GNUC__)
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse2") ? 1 : 0;
#else
        return 1;
#endif
    case PDD_ISA_AVX2:
#if defined(__GNUC__)
        __builtin_cpu_init();
        return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
        return 0;
#endif
    case PDD_ISA_AVX512:
#if defined(__GNUC__)
        __builtin_cpu_init();
        return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2")
                && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
        return 0;
#endif
#endif
    default:
        return 0;
    }
}

/* the best available set (isa < 0), or the one asked for (NULL when not available) */
const pdd_kernels *pdd_pick_kernels(int isa, int *chosen)
{
    if (isa < 0)
        /* avx512 only when asked for: slower than avx2 where measured (docs/benchmarks.md) */
        isa = pdd_isa_available(PDD_ISA_AVX2) ? PDD_ISA_AVX2
            : pdd_isa_available(PDD_ISA_SSE2) ? PDD_ISA_SSE2 : PDD_ISA_PORTABLE;
    if (!pdd_isa_available(isa))
        return NULL;
    *chosen = isa;
    switch (isa) {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    case PDD_ISA_AVX512: return pdd_kernels_avx512();
    case PDD_ISA_AVX2: return pdd_kernels_avx2();
    case PDD_ISA_SSE2: return pdd_kernels_sse2();
#endif
    default: return pdd_kernels_portable();
    }
}

/* ---- threads ---------------------------------------------------------------------------- */

typedef struct {
    void (*fn)(void *, long long, int);
    void *ctx;
    long long n;
    long long next;     /* the next item, taken with an atomic add (dynamic scheduling) */
    int tid;
} job;

typedef struct {
    job *j;
    int tid;
} worker_arg;

static void *worker(void *p)
{
    worker_arg *w = (worker_arg *)p;
    for (;;) {
        long long item = __atomic_fetch_add(&w->j->next, 1, __ATOMIC_RELAXED);
        if (item >= w->j->n)
            break;
        w->j->fn(w->j->ctx, item, w->tid);
    }
    return NULL;
}

void pdd_parallel_for(int threads, long long n, void (*fn)(void *, long long, int), void *ctx)
{
    job j = {fn, ctx, n, 0, 0};
    pthread_t tids[256];
    worker_arg args[256];
    int started = 0;
    if (threads > 256)
        threads = 256;
    if (threads > n)
        threads = (int)(n > 0 ? n : 1);
    for (int t = 1; t < threads; ++t) {
        args[t].j = &j;
        args[t].tid = t;
        if (pthread_create(&tids[t], NULL, worker, &args[t]) != 0)
            break;
        started = t;
    }
    args[0].j = &j;
    args[0].tid = 0;
    worker(&args[0]);
    for (int t = 1; t <= started; ++t)
        pthread_join(tids[t], NULL);
}

/* ---- session ------------------------------------------------------------------------------ */

static void *alloc_floats(size_t n)
{
    void *p = NULL;
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    if (bytes == 0)
        bytes = 64;
    if (posix_memalign(&p, 64, bytes) != 0)
        return NULL;
    memset(p, 0, bytes);  /* touch every page now: no page faults during the runs */
    return p;
}

static int make_taps(pdd_taps *t, const double *pos, long long count, int n)
{
    t->i0 = (int *)malloc(sizeof(int) * (size_t)count);
    t->i1 = (int *)malloc(sizeof(int) * (size_t)count);
    t->w0 = (float *)malloc(sizeof(float) * (size_t)count);
    t->w1 = (float *)malloc(sizeof(float) * (size_t)count);
    if (!t->i0 || !t->i1 || !t->w0 || !t->w1)
        return -1;
    for (long long p = 0; p < count; ++p) {
        /* voxel coordinate of a normalised position (align_corners=False), border clamp */
        double v = ((pos[p] + 1.0) * n - 1.0) / 2.0;
        int i0;
        double w1;
        if (v < 0.0)
            v = 0.0;
        if (v > n - 1.0)
            v = n - 1.0;
        i0 = (int)v;
        if (n >= 2 && i0 > n - 2)
            i0 = n - 2;
        if (n < 2)
            i0 = 0;
        w1 = n >= 2 ? v - i0 : 0.0;
        t->i0[p] = i0;
        t->i1[p] = n >= 2 ? i0 + 1 : 0;
        t->w0[p] = (float)(1.0 - w1);
        t->w1[p] = (float)w1;
    }
    return 0;
}

static void free_taps(pdd_taps *t)
{
    free(t->i0); free(t->i1); free(t->w0); free(t->w1);
}

void pdd_head_destroy(pdd_head *h)
{
    if (!h)
        return;
    for (int a = 0; a < 3; ++a) {
        free_taps(&h->ctl[a]);
        free_taps(&h->dsp[a]);
    }
    free(h->A); free(h->B); free(h->F); free(h->V); free(h->scratch);
    free(h);
}

/* the arguments: pdd_head.h */
pdd_head *pdd_head_create(const int *ints, const float *floats, const double *disp)
{
    pdd_head *h = (pdd_head *)calloc(1, sizeof(pdd_head));
    int chosen = 0;
    const pdd_kernels *k;
    if (!h)
        return NULL;
    h->C = ints[0];
    for (int a = 0; a < 3; ++a) {
        h->n[a] = ints[1 + a];
        h->G[a] = ints[4 + a];
    }
    h->L = ints[7];
    h->mode = ints[8];
    h->threads = ints[9] < 1 ? 1 : ints[9];
    if (h->C < 1 || h->L < 1 || h->L > 64 || h->n[0] < 1 || h->n[1] < 1 || h->n[2] < 1
        || h->G[0] < 1 || h->G[1] < 1 || h->G[2] < 1 || (h->mode != 0 && h->mode != 1)) {
        free(h);
        return NULL;
    }
    k = pdd_pick_kernels(ints[10], &chosen);
    if (!k) {
        free(h);
        return NULL;
    }
    h->isa = chosen;
    /* displacement lines padded to whole vectors of the kernel set (16 lanes for AVX-512) */
    h->LP = chosen == PDD_ISA_AVX512 ? (h->L + 15) / 16 * 16 : (h->L + 7) / 8 * 8;
    h->L3 = (long long)h->L * h->L * h->L;
    h->ncp = (long long)h->G[0] * h->G[1] * h->G[2];
    h->a1 = floats[0]; h->b1 = floats[1]; h->a2 = floats[2]; h->b2 = floats[3];
    h->c2 = floats[4]; h->s = floats[5]; h->t = floats[6]; h->pen1 = floats[7];
    h->pen2 = floats[8];
    for (int a = 0; a < 3; ++a)
        for (int d = 0; d < h->L; ++d)
            h->ex[a][d] = floats[9 + a * h->L + d];
    for (int a = 0; a < 3; ++a) {
        const int G = h->G[a], L = h->L;
        double *ctl = (double *)malloc(sizeof(double) * (size_t)G);
        double *dsp = (double *)malloc(sizeof(double) * (size_t)G * (size_t)L);
        int bad;
        if (!ctl || !dsp) {
            free(ctl); free(dsp);
            pdd_head_destroy(h);
            return NULL;
        }
        for (int g = 0; g < G; ++g) {
            ctl[g] = (2.0 * g + 1.0) / G - 1.0;
            for (int d = 0; d < L; ++d)
                dsp[(long long)g * L + d] = ctl[g] + disp[a * L + d];
        }
        bad = make_taps(&h->ctl[a], ctl, G, h->n[a])
            || make_taps(&h->dsp[a], dsp, (long long)G * L, h->n[a]);
        free(ctl); free(dsp);
        if (bad) {
            pdd_head_destroy(h);
            return NULL;
        }
    }
    {
        const long long vol = h->ncp * h->L3;
        const long long L3P = (h->L3 + 15) / 16 * 16;
        /* per thread: Mi, one column and the five-column ring of the slab pass, two blocks */
        h->scratch_per_thread = (size_t)((long long)h->C * h->L * h->n[1] * h->LP
                                         + 6 * (long long)h->G[1] * L3P + 4 * L3P + 64);
        h->A = (float *)alloc_floats((size_t)vol);
        h->B = (float *)alloc_floats((size_t)vol);
        h->F = (float *)alloc_floats((size_t)(h->ncp * h->C));
        h->V = (float *)alloc_floats((size_t)((long long)h->G[2] * h->C * h->n[0] * h->n[1]
                                              * h->LP));
        h->scratch = (float *)alloc_floats(h->scratch_per_thread * (size_t)h->threads);
        if (!h->A || !h->B || !h->F || !h->V || !h->scratch) {
            pdd_head_destroy(h);
            return NULL;
        }
    }
    return h;
}

int pdd_head_isa(const pdd_head *h) { return h->isa; }
int pdd_head_threads(const pdd_head *h) { return h->threads; }

size_t pdd_head_bytes(const pdd_head *h)
{
    return sizeof(float) * ((size_t)(2 * h->ncp * h->L3)
                            + (size_t)(h->ncp * h->C)
                            + (size_t)((long long)h->G[2] * h->C * h->n[0] * h->n[1] * h->LP)
                            + h->scratch_per_thread * (size_t)h->threads);
}

static const pdd_kernels *kernels(const pdd_head *h)
{
    int chosen;
    return pdd_pick_kernels(h->isa, &chosen);
}

/* ---- passes ------------------------------------------------------------------------------- */

typedef struct {
    pdd_head *h;
    const pdd_kernels *k;
    int smooth;
    const float *src, *base, *moving;
    float *ssd, *dst, *probs, *disp, *entropy;
    float a, b, pen, p, q, r;
} pass;

/* a pass over session h, every other field zero; -1 when its kernel set is unavailable */
static int begin_pass(pass *P, pdd_head *h)
{
    memset(P, 0, sizeof(*P));
    P->h = h;
    P->k = kernels(h);
    return P->k ? 0 : -1;
}

static float *scr(const pass *P, int tid)
{
    return P->h->scratch + P->h->scratch_per_thread * (size_t)tid;
}

static void slab_item(void *ctx, long long gi, int tid)
{
    pass *P = (pass *)ctx;
    P->k->slab(P->h, (int)gi, P->moving, P->src, P->ssd, P->dst, P->a, P->b, P->pen, P->smooth,
               scr(P, tid));
}

static void kcol_item(void *ctx, long long gk, int tid)
{
    pass *P = (pass *)ctx;
    (void)tid;
    P->k->kcol(P->h, P->moving, (int)gk);
}

/* the fixed features at the control points and V (the moving features along k) */
static void prepare_pass(pass *P, const float *fixed, const float *moving)
{
    P->k->prepare(P->h, fixed, moving);
    P->moving = moving;
    pdd_parallel_for(P->h->threads, P->h->G[2], kcol_item, P);
}

static void irow_item(void *ctx, long long item, int tid)
{
    /* item = gj * G_i + gi: a worker walks down one g_j column, the five rows in cache */
    pass *P = (pass *)ctx;
    const int Gi = P->h->G[0];
    (void)tid;
    P->k->irow(P->h, (int)(item % Gi), (int)(item / Gi), P->src, P->dst, P->base, P->p, P->q,
               P->r, P->smooth);
}

static void final_item(void *ctx, long long item, int tid)
{
    pass *P = (pass *)ctx;
    const int Gi = P->h->G[0];
    P->k->final_row(P->h, (int)(item % Gi), (int)(item / Gi), P->src, P->probs, P->disp,
                    P->entropy, P->smooth, scr(P, tid));
}

static long long rows(const pdd_head *h) { return (long long)h->G[0] * h->G[1]; }

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* wall time (ms) of the passes of the last pdd_head_run: prepare, correlation + first step's
 * min-convolution and g_j, g_k smoothing, g_i smoothing + second input, second step's
 * min-convolution and g_j, g_k smoothing, g_i smoothing + softmax, expectation, entropy */
static double last_times[5];

void pdd_head_last_times(double *out)
{
    memcpy(out, last_times, sizeof(last_times));
}

/* the whole head: probs (G^3 L^3, may be NULL), disp (G^3 x 3), entropy (G^3, may be NULL) */
int pdd_head_run(pdd_head *h, const float *fixed, const float *moving, float *probs,
                 float *disp, float *entropy)
{
    pass P;
    if (begin_pass(&P, h) != 0)
        return -1;
    double t0 = now_ms(), t1;
    prepare_pass(&P, fixed, moving);
    t1 = now_ms(); last_times[0] = t1 - t0; t0 = t1;
    /* correlation -> A (the SSD); min-convolution of a1 SSD + b1, smoothing along g_j, g_k -> B */
    P.moving = moving; P.smooth = 1; P.ssd = h->A; P.dst = h->B; P.a = h->a1; P.b = h->b1;
    P.pen = h->pen1;
    pdd_parallel_for(h->threads, h->G[0], slab_item, &P);
    t1 = now_ms(); last_times[1] = t1 - t0; t0 = t1;
    /* smoothing along g_i, and the second step's input: A = a2 SSD + c2 first + b2 */
    P.src = h->B; P.dst = h->A; P.base = h->A; P.p = h->a2; P.q = h->c2; P.r = h->b2;
    pdd_parallel_for(h->threads, rows(h), irow_item, &P);
    t1 = now_ms(); last_times[2] = t1 - t0; t0 = t1;
    /* second step: min-convolution and g_j, g_k smoothing -> B */
    P.moving = NULL; P.src = h->A; P.ssd = NULL; P.dst = h->B; P.a = 1.0f; P.b = 0.0f;
    P.pen = h->pen2;
    pdd_parallel_for(h->threads, h->G[0], slab_item, &P);
    t1 = now_ms(); last_times[3] = t1 - t0; t0 = t1;
    /* g_i smoothing, softmax, expectation, entropy */
    P.src = h->B; P.probs = probs; P.disp = disp; P.entropy = entropy;
    pdd_parallel_for(h->threads, rows(h), final_item, &P);
    last_times[4] = now_ms() - t0;
    return 0;
}

/* the single steps, for tests and diagnostics (each uses the session scratch) */
int pdd_head_correlation(pdd_head *h, const float *fixed, const float *moving, float *out)
{
    pass P;
    if (begin_pass(&P, h) != 0)
        return -1;
    prepare_pass(&P, fixed, moving);
    P.ssd = out;
    pdd_parallel_for(h->threads, h->G[0], slab_item, &P);
    return 0;
}

int pdd_head_minconv(pdd_head *h, const float *in, float *out, float pen)
{
    pass P;
    if (begin_pass(&P, h) != 0)
        return -1;
    P.src = in; P.dst = out; P.a = 1.0f; P.b = 0.0f; P.pen = pen; P.smooth = 0;
    pdd_parallel_for(h->threads, h->G[0], slab_item, &P);
    return 0;
}

int pdd_head_mean_field(pdd_head *h, const float *in, float *out, float pen)
{
    pass P;
    if (begin_pass(&P, h) != 0)
        return -1;
    P.src = in; P.dst = h->B; P.a = 1.0f; P.b = 0.0f; P.pen = pen; P.smooth = 1;
    pdd_parallel_for(h->threads, h->G[0], slab_item, &P);
    P.src = h->B; P.dst = out; P.base = NULL;
    pdd_parallel_for(h->threads, rows(h), irow_item, &P);
    return 0;
}

int pdd_head_softmax(pdd_head *h, const float *cost, float *probs, float *disp, float *entropy)
{
    pass P;
    if (begin_pass(&P, h) != 0)
        return -1;
    P.src = cost; P.probs = probs; P.disp = disp; P.entropy = entropy; P.smooth = 0;
    pdd_parallel_for(h->threads, rows(h), final_item, &P);
    return 0;
}

/* ---- upsampling of the grid displacements to the image grid --------------------------------- */

typedef struct {
    int G[3], n[3];
    const int *ptr[3], *col;      /* CSR rows of the three interpolation matrices (n_a x G_a) */
    const float *val, *scale, *grid;
    float *out, *scratch;
    size_t per_thread;
} upsample_job;

/* one image slice i: the grid interpolated along i (row i), then along j per image row, then
 * along k per voxel, times the voxels per normalised unit of each component */
static void upsample_item(void *ctx, long long item, int tid)
{
    upsample_job *J = (upsample_job *)ctx;
    const int i = (int)item, Gj = J->G[1], Gk = J->G[2], nj = J->n[1], nk = J->n[2];
    const long long plane = (long long)Gj * Gk * 3;
    float *t1 = J->scratch + J->per_thread * (size_t)tid, *t2 = t1 + plane;
    for (long long x = 0; x < plane; ++x)
        t1[x] = 0.0f;
    for (int p = J->ptr[0][i]; p < J->ptr[0][i + 1]; ++p) {
        const float w = J->val[p];
        const float *g = J->grid + (long long)J->col[p] * plane;
        for (long long x = 0; x < plane; ++x)
            t1[x] += w * g[x];
    }
    for (int j = 0; j < nj; ++j) {
        for (int x = 0; x < Gk * 3; ++x)
            t2[x] = 0.0f;
        for (int p = J->ptr[1][j]; p < J->ptr[1][j + 1]; ++p) {
            const float w = J->val[p];
            const float *g = t1 + (long long)J->col[p] * Gk * 3;
            for (int x = 0; x < Gk * 3; ++x)
                t2[x] += w * g[x];
        }
        float *y = J->out + ((long long)i * nj + j) * nk * 3;
        for (int k = 0; k < nk; ++k) {
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
            for (int p = J->ptr[2][k]; p < J->ptr[2][k + 1]; ++p) {
                const float w = J->val[p];
                const float *g = t2 + (long long)J->col[p] * 3;
                a0 += w * g[0];
                a1 += w * g[1];
                a2 += w * g[2];
            }
            y[3 * k] = a0 * J->scale[0];
            y[3 * k + 1] = a1 * J->scale[1];
            y[3 * k + 2] = a2 * J->scale[2];
        }
    }
}

/* out (n_i, n_j, n_k, 3) = the separable interpolation of grid (G_i, G_j, G_k, 3), times scale.
 * ints: G_i, G_j, G_k, n_i, n_j, n_k, threads; ptr: the three CSR row pointers one after the
 * other (n_i + 1, n_j + 1, n_k + 1 entries, indices into col/val).  Returns -1 when out of
 * memory. */
int pdd_upsample(const int *ints, const int *ptr, const int *col, const float *val,
                 const float *scale, const float *grid, float *out)
{
    upsample_job J;
    int threads = ints[6] < 1 ? 1 : ints[6];
    for (int a = 0; a < 3; ++a) {
        J.G[a] = ints[a];
        J.n[a] = ints[3 + a];
    }
    J.ptr[0] = ptr;
    J.ptr[1] = ptr + J.n[0] + 1;
    J.ptr[2] = J.ptr[1] + J.n[1] + 1;
    J.col = col; J.val = val; J.scale = scale; J.grid = grid; J.out = out;
    J.per_thread = (size_t)J.G[1] * J.G[2] * 3 + (size_t)J.G[2] * 3 + 16;
    J.scratch = (float *)malloc(sizeof(float) * J.per_thread * (size_t)threads);
    if (!J.scratch)
        return -1;
    pdd_parallel_for(threads, J.n[0], upsample_item, &J);
    free(J.scratch);
    return 0;
}
