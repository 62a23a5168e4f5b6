/* A plain-C driver of the kernel library for machines without Python: runs every entry point
 * (fused head with probabilities and entropy, upsampling, OBELISK sampling, the features
 * refinement loop) on deterministic inputs and prints the results, one number per line.
 * scripts/cross_aarch64.sh builds it for aarch64 and runs it under qemu-user, then compares the
 * output with the same driver built here with the portable kernel set.
 *
 *   cc -O2 -I src/pddnet/backends/native scripts/native_selftest.c <library sources> -lm -pthread
 *   ./a.out ISA          (ISA: -1 best, 0 portable, 1 sse2, 2 avx2, 3 avx512) */
#include <stdio.h>
#include <stdlib.h>

#include "pdd_head.h"

static unsigned long long state = 88172645463325252ULL;

static double uniform(void)   /* xorshift64: the same numbers on every machine */
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (double)(state >> 11) / 9007199254740992.0;
}

static float *randoms(long long n, double lo, double hi)
{
    float *x = (float *)malloc(sizeof(float) * (size_t)n);
    for (long long i = 0; i < n; ++i)
        x[i] = (float)(lo + (hi - lo) * uniform());
    return x;
}

static void show(const char *name, const float *x, long long n)
{
    for (long long i = 0; i < n; ++i)
        printf("%s %lld %.9g\n", name, i, x[i]);
}

int main(int argc, char **argv)
{
    const int isa = argc > 1 ? atoi(argv[1]) : -1;
    /* the fused head: C = 3, features 9 x 11 x 13, grid 5 x 7 x 6, L = 7 */
    const int C = 3, n[3] = {9, 11, 13}, G[3] = {5, 7, 6}, L = 7;
    const long long nf = (long long)C * n[0] * n[1] * n[2], ncp = (long long)G[0] * G[1] * G[2];
    int ints[11] = {C, n[0], n[1], n[2], G[0], G[1], G[2], L, 0, 2, isa};
    float floats[9 + 3 * 7] = {0.7f, 0.1f, 0.5f, -0.2f, 0.8f, -3.0f, 0.25f, 0.0f, 0.0f};
    double disp[3 * 7];
    for (int a = 0; a < 3; ++a)
        for (int d = 0; d < L; ++d) {
            disp[a * L + d] = -0.3 + 0.6 * d / (L - 1);
            floats[9 + a * L + d] = (float)disp[a * L + d];
        }
    float *fixed = randoms(nf, -1.0, 1.0), *moving = randoms(nf, -1.0, 1.0);
    float *probs = (float *)malloc(sizeof(float) * (size_t)(ncp * L * L * L));
    float *gd = (float *)malloc(sizeof(float) * (size_t)(ncp * 3));
    float *ent = (float *)malloc(sizeof(float) * (size_t)ncp);
    pdd_head *h = pdd_head_create(ints, floats, disp);
    if (!h) {
        fprintf(stderr, "pdd_head_create failed (kernel set %d not available?)\n", isa);
        return 2;
    }
    fprintf(stderr, "kernel set %d\n", pdd_head_isa(h));
    if (pdd_head_run(h, fixed, moving, probs, gd, ent) != 0)
        return 3;
    show("grid_disp", gd, ncp * 3);
    show("entropy", ent, ncp);
    show("probs", probs, 2 * L * L * L);
    pdd_head_destroy(h);

    /* upsampling to 10 x 12 x 9 with two-tap rows (a hand-made CSR of each axis) */
    {
        const int N[3] = {10, 12, 9};
        int up_ints[7] = {G[0], G[1], G[2], N[0], N[1], N[2], 2};
        int ptr[10 + 1 + 12 + 1 + 9 + 1], col[2 * (10 + 12 + 9)];
        float val[2 * (10 + 12 + 9)], scale[3] = {5.0f, 6.0f, 4.5f};
        int p = 0, r = 0;
        for (int a = 0; a < 3; ++a) {
            for (int i = 0; i < N[a]; ++i) {
                double v = ((2.0 * i + 1.0) / N[a] * G[a] - 1.0) / 2.0;
                int i0 = v < 0 ? 0 : (int)v;
                double w = v - i0;
                if (i0 > G[a] - 2) { i0 = G[a] - 2; w = v > G[a] - 1 ? 1.0 : v - i0; }
                if (w < 0) w = 0;
                ptr[r++] = p;
                col[p] = i0; val[p++] = (float)(1.0 - w);
                col[p] = i0 + 1; val[p++] = (float)w;
            }
            ptr[r++] = p;
        }
        float *grid = randoms(ncp * 3, -0.3, 0.3);
        float *out = (float *)malloc(sizeof(float) * (size_t)N[0] * N[1] * N[2] * 3);
        if (pdd_upsample(up_ints, ptr, col, val, scale, grid, out) != 0)
            return 4;
        show("upsample", out, (long long)N[0] * N[1] * N[2] * 3);
        free(grid); free(out);
    }

    /* OBELISK sampling: C = 4, 12 x 10 x 14 -> 5 x 4 x 6, S = 5 offsets reaching outside */
    {
        int s_ints[9] = {4, 12, 10, 14, 5, 5, 4, 6, 2};
        float *X = randoms(4LL * 12 * 10 * 14, -1.0, 1.0);
        float *o0 = randoms(15, -0.6, 0.6), *o1 = randoms(15, -0.6, 0.6);
        float *Y = (float *)malloc(sizeof(float) * 4 * 5 * 5 * 4 * 6);
        if (pdd_obelisk_sample(s_ints, X, o0, o1, Y) != 0)
            return 5;
        show("obelisk", Y, 4LL * 5 * 5 * 4 * 6);
        free(X); free(o0); free(o1); free(Y);
    }

    /* the Winograd 3x3x3 convolution: 13 -> 20 channels, 7 x 5 x 9, bias and relu; then with
     * a 1x1x1 convolution 9 -> 13 (bias, relu) fused before it */
    {
        int c_ints[10] = {13, 20, 7, 5, 9, 1, 2, isa, 0, 0};
        float *X = randoms(13LL * 7 * 5 * 9, -1.0, 1.0), *Xp = randoms(9LL * 7 * 5 * 9, -1.0, 1.0);
        float *U = randoms(64LL * 13 * 20, -0.3, 0.3), *b = randoms(20, -0.2, 0.2);
        float *Wp = randoms(9LL * 13, -0.4, 0.4), *bp = randoms(13, -0.2, 0.2);
        float *Y = (float *)malloc(sizeof(float) * 20 * 7 * 5 * 9);
        float *work = (float *)malloc(sizeof(float) * (size_t)pdd_conv3_work_floats(c_ints));
        if (pdd_conv3_winograd(c_ints, U, b, NULL, NULL, X, Y, work) != 0)
            return 7;
        show("conv3", Y, 20LL * 7 * 5 * 9);
        c_ints[8] = 9;
        c_ints[9] = 1;
        if (pdd_conv3_winograd(c_ints, U, b, Wp, bp, Xp, Y, work) != 0)
            return 8;
        show("conv3_pre", Y, 20LL * 7 * 5 * 9);
        free(X); free(Xp); free(U); free(b); free(Wp); free(bp); free(Y); free(work);
    }

    /* the features refinement loop: 6 x 5 x 7 grid, 4 channels, 10 Adam steps */
    {
        const int N = 6 * 5 * 7, k = 4;
        int r_ints[6] = {6, 5, 7, k, 10, 2};
        double params[5] = {0.05, 0.9, 0.999, 1e-8, 0.5}, res[4];
        double *f = (double *)malloc(sizeof(double) * N * k);
        double *m = (double *)malloc(sizeof(double) * N * k);
        double *theta = (double *)calloc((size_t)N * 3, sizeof(double));
        double *u = (double *)malloc(sizeof(double) * N * 3);
        for (int i = 0; i < N * k; ++i) {
            f[i] = uniform() - 0.5;
            m[i] = uniform() - 0.5;
        }
        if (pdd_feature_refine(r_ints, params, f, m, theta, u, res) != 0)
            return 6;
        for (int i = 0; i < N * 3; ++i)
            printf("refine_u %d %.15g\n", i, u[i]);
        for (int i = 0; i < 4; ++i)
            printf("refine_energy %d %.15g\n", i, res[i]);
        free(f); free(m); free(theta); free(u);
    }
    free(fixed); free(moving); free(probs); free(gd); free(ent);
    return 0;
}
