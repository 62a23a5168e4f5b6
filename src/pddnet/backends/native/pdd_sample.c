/* OBELISK sampling: the two DeformableSample3D nodes of the feature network and the Sub of
 * their results ("ObeliskDiff") in one pass (docs/ops.md, "DeformableSample3D").
 *
 *   Y[0, c*S + s, p, q, r] = trilinear(X[0, c], u + off0[s]) - trilinear(X[0, c], u + off1[s])
 *
 * u = the cell centre of output voxel (p, q, r) (align_corners=False); the voxel coordinate
 * ((pos + 1) n - 1) / 2 clamped to [0, n - 1] (border padding).  The trilinear weights are
 * separable, so the two taps and weights of each (offset, axis, output index) are computed
 * once per call (in double precision, like the float64 reference) and shared by every output
 * point and channel that uses them.  Per output slab (s, p), for both offset sets:
 * interpolation along i (two whole input planes -> one J x K plane per channel, contiguous),
 * per output row q along j (two lines -> one K line per channel), then along k (two taps per
 * output voxel), the second set subtracted before the one store.  Only Y is written, never
 * the two sampled tensors.
 *
 * Plain C, default flags (the compiler vectorises the i and j passes); threads take slabs
 * through pdd_parallel_for (pdd_head.c).  No Python API. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pdd_head.h"

/* taps of one axis for one offset set: index s * nout + p */
typedef struct {
    int *i0, *i1;
    float *w0, *w1;
} stap;

static void free_taps(stap *t)
{
    free(t->i0);
    free(t->i1);
    free(t->w0);
    free(t->w1);
}

static int make_axis_taps(stap *t, const float *off, int S, int axis, int nout, int n)
{
    size_t count = (size_t)S * (size_t)nout;
    t->i0 = (int *)malloc(sizeof(int) * count);
    t->i1 = (int *)malloc(sizeof(int) * count);
    t->w0 = (float *)malloc(sizeof(float) * count);
    t->w1 = (float *)malloc(sizeof(float) * count);
    if (!t->i0 || !t->i1 || !t->w0 || !t->w1)
        return -2;
    for (int s = 0; s < S; ++s) {
        const double o = (double)off[3 * s + axis];
        for (int p = 0; p < nout; ++p) {
            const double u = (2.0 * p + 1.0) / (double)nout - 1.0;
            double x = ((u + o + 1.0) * (double)n - 1.0) * 0.5;
            if (!(x > 0.0))   /* also NaN -> 0 */
                x = 0.0;
            if (x > (double)(n - 1))
                x = (double)(n - 1);
            int i0 = (int)floor(x);
            if (i0 > n - 1)
                i0 = n - 1;
            const int i1 = i0 + 1 < n ? i0 + 1 : n - 1;
            const double w1 = x - (double)i0;
            const size_t at = (size_t)s * (size_t)nout + (size_t)p;
            t->i0[at] = i0;
            t->i1[at] = i1;
            t->w0[at] = (float)(1.0 - w1);
            t->w1[at] = (float)w1;
        }
    }
    return 0;
}

typedef struct {
    int C, n[3], S, m[3];
    const float *X;
    float *Y;
    stap tap[2][3];          /* [offset set][axis] */
    float *Xt;               /* X as [c][i][k][j] */
    float *scratch;          /* per thread: C n_j n_k (along i) + 3 C n_j m_k (along k) */
    size_t per_thread;       /* floats */
} sample_job;

/* X transposed per (c, i) plane: Xt[c, i, k, j] (j fastest), so that the pass along k is
 * whole-line arithmetic over j */
static void transpose_item(void *ctx, long long item, int tid)
{
    sample_job *J = (sample_job *)ctx;
    const int nj = J->n[1], nk = J->n[2];
    const size_t plane = (size_t)nj * (size_t)nk;
    const float *restrict a = J->X + (size_t)item * plane;
    float *restrict d = J->Xt + (size_t)item * plane;
    (void)tid;
    for (int j = 0; j < nj; ++j)
        for (int k = 0; k < nk; ++k)
            d[(size_t)k * (size_t)nj + (size_t)j] = a[(size_t)j * (size_t)nk + (size_t)k];
}

/* one output slab: offset s, output index p along i */
static void slab(void *ctx, long long item, int tid)
{
    sample_job *J = (sample_job *)ctx;
    const int C = J->C, nj = J->n[1], nk = J->n[2], S = J->S;
    const int mi = J->m[0], mj = J->m[1], mk = J->m[2];
    const int s = (int)(item / mi), p = (int)(item % mi);
    const size_t plane = (size_t)nj * (size_t)nk, vol = (size_t)J->n[0] * plane;
    const size_t qplane = (size_t)nj * (size_t)mk;
    float *P = J->scratch + (size_t)tid * J->per_thread;  /* [c][k][j], reused per set */
    float *Q = P + (size_t)C * plane;                       /* [c][r][j], reused per set */
    float *T[2];                                            /* [c][j][r] per set */
    T[0] = Q + (size_t)C * qplane;
    T[1] = T[0] + (size_t)C * qplane;

    for (int t = 0; t < 2; ++t) {
        /* along i: P[c] = w0 Xt[c, i0] + w1 Xt[c, i1] (whole planes) */
        const size_t at = (size_t)s * (size_t)mi + (size_t)p;
        const float w0 = J->tap[t][0].w0[at], w1 = J->tap[t][0].w1[at];
        const size_t i0 = (size_t)J->tap[t][0].i0[at], i1 = (size_t)J->tap[t][0].i1[at];
        for (int c = 0; c < C; ++c) {
            const float *restrict a = J->Xt + (size_t)c * vol + i0 * plane;
            const float *restrict b = J->Xt + (size_t)c * vol + i1 * plane;
            float *restrict d = P + (size_t)c * plane;
            for (size_t x = 0; x < plane; ++x)
                d[x] = w0 * a[x] + w1 * b[x];
        }
        /* along k: Q[c, r] = w0[r] P[c, k0[r]] + w1[r] P[c, k1[r]] (whole lines over j) */
        const size_t ko = (size_t)s * (size_t)mk;
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < mk; ++r) {
                const float v0 = J->tap[t][2].w0[ko + r], v1 = J->tap[t][2].w1[ko + r];
                const float *restrict a = P + (size_t)c * plane
                                          + (size_t)J->tap[t][2].i0[ko + r] * (size_t)nj;
                const float *restrict b = P + (size_t)c * plane
                                          + (size_t)J->tap[t][2].i1[ko + r] * (size_t)nj;
                float *restrict d = Q + (size_t)c * qplane + (size_t)r * (size_t)nj;
                for (int j = 0; j < nj; ++j)
                    d[j] = v0 * a[j] + v1 * b[j];
            }
        /* T[t][c, j, r] = Q[c, r, j] */
        for (int c = 0; c < C; ++c) {
            const float *restrict a = Q + (size_t)c * qplane;
            float *restrict d = T[t] + (size_t)c * qplane;
            for (int j = 0; j < nj; ++j)
                for (int r = 0; r < mk; ++r)
                    d[(size_t)j * (size_t)mk + (size_t)r] = a[(size_t)r * (size_t)nj + (size_t)j];
        }
    }
    /* along j, both sets, the difference stored once (whole output lines) */
    const size_t oplane = (size_t)mj * (size_t)mk;
    for (int q = 0; q < mj; ++q) {
        const size_t a0 = (size_t)s * (size_t)mj + (size_t)q;
        const float u0 = J->tap[0][1].w0[a0], u1 = J->tap[0][1].w1[a0];
        const float x0 = J->tap[1][1].w0[a0], x1 = J->tap[1][1].w1[a0];
        const size_t j00 = (size_t)J->tap[0][1].i0[a0], j01 = (size_t)J->tap[0][1].i1[a0];
        const size_t j10 = (size_t)J->tap[1][1].i0[a0], j11 = (size_t)J->tap[1][1].i1[a0];
        for (int c = 0; c < C; ++c) {
            const float *restrict q0 = T[0] + (size_t)c * qplane;
            const float *restrict q1 = T[1] + (size_t)c * qplane;
            const float *restrict a = q0 + j00 * (size_t)mk, *restrict b = q0 + j01 * (size_t)mk;
            const float *restrict e = q1 + j10 * (size_t)mk, *restrict f = q1 + j11 * (size_t)mk;
            float *restrict y = J->Y + ((size_t)c * (size_t)S + (size_t)s) * (size_t)mi * oplane
                                + (size_t)p * oplane + (size_t)q * (size_t)mk;
            for (int r = 0; r < mk; ++r)
                y[r] = (u0 * a[r] + u1 * b[r]) - (x0 * e[r] + x1 * f[r]);
        }
    }
}

/* ints: C, n_i, n_j, n_k, S, m_i, m_j, m_k, threads.  X (1, C, n_i, n_j, n_k); off0, off1
 * (S, 3) normalised offsets; Y (1, C S, m_i, m_j, m_k).  0, -1 (bad arguments), -2 (memory). */
int pdd_obelisk_sample(const int *ints, const float *X, const float *off0, const float *off1,
                       float *Y)
{
    sample_job J;
    memset(&J, 0, sizeof J);
    J.C = ints[0];
    for (int a = 0; a < 3; ++a) {
        J.n[a] = ints[1 + a];
        J.m[a] = ints[5 + a];
    }
    J.S = ints[4];
    int threads = ints[8];
    if (J.C < 1 || J.S < 1 || !X || !off0 || !off1 || !Y)
        return -1;
    for (int a = 0; a < 3; ++a)
        if (J.n[a] < 1 || J.m[a] < 1)
            return -1;
    if (threads < 1)
        threads = 1;
    if (threads > 256)
        threads = 256;
    J.X = X;
    J.Y = Y;
    int rc = 0;
    for (int t = 0; t < 2 && rc == 0; ++t)
        for (int a = 0; a < 3 && rc == 0; ++a)
            rc = make_axis_taps(&J.tap[t][a], t ? off1 : off0, J.S, a, J.m[a], J.n[a]);
    if (rc == 0) {
        J.per_thread = (size_t)J.C * (size_t)J.n[1] * ((size_t)J.n[2] + 3 * (size_t)J.m[2]);
        J.per_thread = (J.per_thread + 15) / 16 * 16;   /* whole cache lines per thread */
        J.scratch = (float *)malloc(sizeof(float) * J.per_thread * (size_t)threads);
        J.Xt = (float *)malloc(sizeof(float) * (size_t)J.C * (size_t)J.n[0] * (size_t)J.n[1]
                               * (size_t)J.n[2]);
        if (!J.scratch || !J.Xt)
            rc = -2;
    }
    if (rc == 0) {
        pdd_parallel_for(threads, (long long)J.C * J.n[0], transpose_item, &J);
        pdd_parallel_for(threads, (long long)J.S * J.m[0], slab, &J);
    }
    free(J.scratch);
    free(J.Xt);
    for (int t = 0; t < 2; ++t)
        for (int a = 0; a < 3; ++a)
            free_taps(&J.tap[t][a]);
    return rc;
}
