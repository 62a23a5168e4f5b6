/* pddnet: the whole `features` refinement loop (docs/refinement.md) in double precision.
 * The numpy implementation it must equal is pddnet.runtime.refine (feature_energy,
 * FeatureSampler, diffusion, _smooth_axis / _smooth_t_axis, Adam).  Plain C and pthreads (through
 * pdd_parallel_for); no Python API, no ISA-specific code.
 *
 * Layout: theta, u, gradients (n_i, n_j, n_k, 3) C order; features channels-last (N, k). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pdd_head.h"

/* the 5-tap filter [1, 2, 3, 2, 1] / 9 of _TAPS */
static const double TAPS[5] = {1.0 / 9.0, 2.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0, 1.0 / 9.0};

typedef struct {
    int n[3], k;
    long long N;
    double half[3], top[3];
    double weight;
    const double *fixed, *moving;
    const double *u;          /* S(theta) */
    double *du;               /* dE/du (grad) */
    double *data_part;        /* per slab i: sum of r^2 */
    double reg_size[3];       /* size_a: number of forward differences along a, times 3 */
    double reg_scale[3];      /* 2 / size_a */
    int grad;
} fr_ctx;

/* one grid axis of S (transpose = 0: replicate padding, valid taps) or S^T (transpose = 1: zero
 * padding plus the two padded entries at each end folded back, as _smooth_t_axis).  zero: a row
 * of at least `inner` zeros (the zero padding of S^T) */
static void smooth_axis(const double *src, double *dst, const int *n, int axis, int transpose,
                        const double *zero)
{
    long long outer = 1, inner = 3;
    int na = n[axis];
    for (int a = 0; a < axis; ++a)
        outer *= n[a];
    for (int a = axis + 1; a < 3; ++a)
        inner *= n[a];
    for (long long o = 0; o < outer; ++o) {
        const double *s = src + o * na * inner;
        double *d = dst + o * na * inner;
        for (int i = 0; i < na; ++i) {
            const double *x[5];
            double *out = d + (long long)i * inner;
            for (int t = 0; t < 5; ++t) {
                int p = i + t - 2;
                if (p < 0 || p >= na)
                    x[t] = transpose ? zero : s + (long long)(p < 0 ? 0 : na - 1) * inner;
                else
                    x[t] = s + (long long)p * inner;
            }
            for (long long e = 0; e < inner; ++e)
                out[e] = TAPS[0] * x[0][e] + TAPS[1] * x[1][e] + TAPS[2] * x[2][e]
                         + TAPS[3] * x[3][e] + TAPS[4] * x[4][e];
        }
        if (transpose) {
            /* entries -2, -1 (n, n + 1) of the padded signal were copies of element 0 (n - 1) */
            const double *x0 = s, *x1 = s + (na > 1 ? inner : 0);
            const double *xl = s + (long long)(na - 1) * inner;
            const double *xp = s + (long long)(na > 1 ? na - 2 : 0) * inner;
            double *o0 = d, *ol = d + (long long)(na - 1) * inner;
            const double f1 = na > 1 ? 1.0 : 0.0;
            for (long long e = 0; e < inner; ++e)
                o0[e] += (TAPS[0] + TAPS[1]) * x0[e] + TAPS[0] * x1[e] * f1;
            for (long long e = 0; e < inner; ++e)
                ol[e] += (TAPS[3] + TAPS[4]) * xl[e] + TAPS[4] * xp[e] * f1;
        }
    }
}

/* S (or S^T) over the three axes: src -> dst, tmp as scratch (all N * 3) */
static void smooth3(const double *src, double *dst, double *tmp, const int *n, int transpose,
                    const double *zero)
{
    smooth_axis(src, tmp, n, 0, transpose, zero);
    smooth_axis(tmp, dst, n, 1, transpose, zero);
    smooth_axis(dst, tmp, n, 2, transpose, zero);
    memcpy(dst, tmp, sizeof(double) * (size_t)n[0] * n[1] * n[2] * 3);
}

#if defined(__GNUC__)
#define PDD_INLINE static inline __attribute__((always_inline))
#else
#define PDD_INLINE static inline
#endif

/* one slab x_i = i: the data term (the sampler) and its gradient in u (into c->du).
 * K is the channel count, a constant where slab() inlines it for k = 1..4 */
PDD_INLINE void slab_k(fr_ctx *c, long long item, const int K)
{
    const int nj = c->n[1], nk = c->n[2];
    const long long sj = nk, si = (long long)nj * nk;
    const int i = (int)item;
    const double scale = 1.0 / ((double)c->N * K);
    double data = 0.0;
    long long off[8];
    double r[64], dcorner[8];
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            for (int d = 0; d < 2; ++d)
                off[4 * a + 2 * b + d] = a * si + b * sj + d;
    for (int j = 0; j < nj; ++j) {
        for (int l = 0; l < nk; ++l) {
            const long long x = i * si + j * sj + l;
            const double *ux = c->u + 3 * x;
            double v[3], w0[3], w1[3];
            long long lin = 0;
            const double pos[3] = {(double)i, (double)j, (double)l};
            const long long strides[3] = {si, sj, 1};
            for (int a = 0; a < 3; ++a) {
                double vv = pos[a] + ux[a] * c->half[a];
                double vc = vv < 0.0 ? 0.0 : (vv > c->top[a] ? c->top[a] : vv);
                double i0 = floor(vc);
                if (i0 > c->top[a] - 1.0)
                    i0 = c->top[a] - 1.0;
                v[a] = vv;
                w1[a] = vc - i0;
                w0[a] = 1.0 - w1[a];
                lin += (long long)i0 * strides[a];
            }
            double wc[8];
            const double *mc[8];
            for (int a = 0; a < 2; ++a)
                for (int b = 0; b < 2; ++b)
                    for (int d = 0; d < 2; ++d) {
                        const int q = 4 * a + 2 * b + d;
                        wc[q] = (a ? w1[0] : w0[0]) * ((b ? w1[1] : w0[1]) * (d ? w1[2] : w0[2]));
                        mc[q] = c->moving + (lin + off[q]) * K;
                    }
            const double *fx = c->fixed + x * K;
            for (int ch = 0; ch < K; ++ch) {
                double s = 0.0;
                for (int q = 0; q < 8; ++q)
                    s += mc[q][ch] * wc[q];
                r[ch] = s - fx[ch];
                data += r[ch] * r[ch];
            }
            if (!c->grad)
                continue;
            for (int q = 0; q < 8; ++q) {
                double s = 0.0;
                for (int ch = 0; ch < K; ++ch)
                    s += mc[q][ch] * r[ch];
                dcorner[q] = s;
            }
            {
                double g[3] = {0.0, 0.0, 0.0};
                for (int b = 0; b < 2; ++b)
                    for (int d = 0; d < 2; ++d)
                        g[0] += (dcorner[4 + 2 * b + d] - dcorner[2 * b + d])
                                * (b ? w1[1] : w0[1]) * (d ? w1[2] : w0[2]);
                for (int a = 0; a < 2; ++a)
                    for (int d = 0; d < 2; ++d)
                        g[1] += (dcorner[4 * a + 2 + d] - dcorner[4 * a + d])
                                * (a ? w1[0] : w0[0]) * (d ? w1[2] : w0[2]);
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b)
                        g[2] += (dcorner[4 * a + 2 * b + 1] - dcorner[4 * a + 2 * b])
                                * (a ? w1[0] : w0[0]) * (b ? w1[1] : w0[1]);
                double *gx = c->du + 3 * x;
                for (int a = 0; a < 3; ++a) {
                    g[a] *= (2.0 * scale) * c->half[a];
                    gx[a] = (v[a] > 0.0 && v[a] < c->top[a]) ? g[a] : 0.0;
                }
            }
        }
    }
    c->data_part[i] = data;
}

static void slab(void *p, long long item, int tid)
{
    fr_ctx *c = (fr_ctx *)p;
    (void)tid;
    switch (c->k) {
    case 1: slab_k(c, item, 1); break;
    case 2: slab_k(c, item, 2); break;
    case 3: slab_k(c, item, 3); break;
    case 4: slab_k(c, item, 4); break;
    default: slab_k(c, item, c->k); break;
    }
}

/* the diffusion term sum_a mean((D_a w)^2) of w = u n / 2 (returned) and, with grad, its
 * gradient times lam n / 2 added to du; w is N * 3 scratch.  Each axis is a pass over
 * contiguous runs: x with x_a < n_a - 1 and its neighbour x + e_a (3 s_a doubles on). */
static double diffusion(const fr_ctx *c, double *w, double *du, int grad)
{
    const int *n = c->n;
    const long long N3 = c->N * 3;
    double total = 0.0;
    for (long long p = 0; p < N3; p += 3)
        for (int q = 0; q < 3; ++q)
            w[p + q] = c->u[p + q] * c->half[q];
    for (int a = 0; a < 3; ++a) {
        long long outer = 1, inner = 3;
        for (int b = 0; b < a; ++b)
            outer *= n[b];
        for (int b = a + 1; b < 3; ++b)
            inner *= n[b];
        const long long run = (long long)(n[a] - 1) * inner, block = (long long)n[a] * inner;
        const double cs = c->reg_scale[a];
        const double kh[3] = {c->weight * c->half[0], c->weight * c->half[1],
                              c->weight * c->half[2]};
        double sum[3] = {0.0, 0.0, 0.0};  /* one per component: independent chains */
        for (long long o = 0; o < outer; ++o) {
            const double *x = w + o * block, *y = x + inner;
            double *g = du + o * block;
            if (!grad) {
                for (long long e = 0; e < run; e += 3)
                    for (int q = 0; q < 3; ++q) {
                        const double d = y[e + q] - x[e + q];
                        sum[q] += d * d;
                    }
                continue;
            }
            /* g[x] -= cs d(x); g[x + e_a] += cs d(x), as diffusion(); times lam n / 2 */
            for (long long e = 0; e < run; e += 3)
                for (int q = 0; q < 3; ++q) {
                    const double d = y[e + q] - x[e + q];
                    const double t = kh[q] * (cs * d);
                    sum[q] += d * d;
                    g[e + q] -= t;
                    g[inner + e + q] += t;
                }
        }
        total += (sum[0] + sum[1] + sum[2]) / c->reg_size[a];
    }
    return total;
}

/* E, data of c->u (and dE/du into c->du when c->grad) */
static void energy(fr_ctx *c, int threads, double *e, double *data, double *w)
{
    const int ni = c->n[0];
    double d = 0.0, reg;
    pdd_parallel_for(threads, ni, slab, c);
    for (int i = 0; i < ni; ++i)
        d += c->data_part[i];
    reg = diffusion(c, w, c->du, c->grad);
    d /= (double)c->N * c->k;
    *data = d;
    *e = d + c->weight * reg;
}

/* ints: n_i, n_j, n_k, k (channels, 1..64), steps, threads
 * params: lr, beta1, beta2, eps, weight (lam)
 * fixed, moving: (N, k) channels-last, float64
 * theta: (N, 3) float64, the start; overwritten with the final theta
 * u_out: (N, 3) float64, S(theta) after the last step
 * out: E before the first step, data before, E after the last, data after
 * Returns 0, -1 for invalid arguments, -2 when out of memory. */
int pdd_feature_refine(const int *ints, const double *params, const double *fixed,
                       const double *moving, double *theta, double *u_out, double *out)
{
    fr_ctx c;
    const int steps = ints[4];
    const int threads = ints[5] < 1 ? 1 : ints[5];
    const double lr = params[0], b1 = params[1], b2 = params[2], eps = params[3];
    int rc = 0;
    memset(&c, 0, sizeof c);
    for (int a = 0; a < 3; ++a) {
        c.n[a] = ints[a];
        if (c.n[a] < 2)
            return -1;
    }
    c.k = ints[3];
    if (c.k < 1 || c.k > 64 || steps < 0)
        return -1;
    c.N = (long long)c.n[0] * c.n[1] * c.n[2];
    for (int a = 0; a < 3; ++a) {
        c.half[a] = c.n[a] / 2.0;
        c.top[a] = c.n[a] - 1.0;
        c.reg_size[a] = (double)(c.n[a] - 1) * (double)(c.N / c.n[a]) * 3.0;
        c.reg_scale[a] = 2.0 / c.reg_size[a];
    }
    c.weight = params[4];
    c.fixed = fixed;
    c.moving = moving;
    const size_t sz = sizeof(double) * (size_t)c.N * 3;
    double *u = (double *)malloc(sz), *du = (double *)malloc(sz), *tmp = (double *)malloc(sz);
    double *g = (double *)malloc(sz);
    double *m = (double *)calloc((size_t)c.N * 3, sizeof(double));
    double *v = (double *)calloc((size_t)c.N * 3, sizeof(double));
    /* the widest row smooth_axis reads: axis 0, n_j n_k 3 */
    double *zero = (double *)calloc((size_t)c.n[1] * c.n[2] * 3, sizeof(double));
    c.data_part = (double *)malloc(sizeof(double) * (size_t)c.n[0]);
    if (!u || !du || !tmp || !g || !m || !v || !zero || !c.data_part) {
        rc = -2;
        goto done;
    }
    c.u = u;
    c.du = du;
    for (int t = 1; t <= steps; ++t) {
        double e, d;
        smooth3(theta, u, tmp, c.n, 0, zero);
        c.grad = 1;
        energy(&c, threads, &e, &d, tmp);
        if (t == 1) {
            out[0] = e;
            out[1] = d;
        }
        smooth3(du, g, tmp, c.n, 1, zero);
        /* Adam.step: PyTorch's update, in the numpy path's order of operations */
        const double step = lr / (1.0 - pow(b1, (double)t));
        const double bc2 = sqrt(1.0 - pow(b2, (double)t));
        for (long long p = 0; p < c.N * 3; ++p) {
            m[p] = m[p] * b1 + (1.0 - b1) * g[p];
            v[p] = v[p] * b2 + ((1.0 - b2) * g[p]) * g[p];
            theta[p] -= (step * m[p]) / (sqrt(v[p]) / bc2 + eps);
        }
    }
    smooth3(theta, u, tmp, c.n, 0, zero);
    c.grad = 0;
    energy(&c, threads, &out[2], &out[3], tmp);
    if (steps == 0) {
        out[0] = out[2];
        out[1] = out[3];
    }
    memcpy(u_out, u, sz);
done:
    free(u); free(du); free(tmp); free(g); free(m); free(v); free(zero);
    free(c.data_part);
    return rc;
}
