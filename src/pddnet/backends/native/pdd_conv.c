/* A 3x3x3 convolution (stride 1, zero padding 1, one group) by Winograd F(2x2x2, 3x3x3): the
 * feature network's Conv2, 79 % of its FLOPs, with 64 products of (tiles x Cin) (Cin x Cout)
 * matrices per 2x2x2 output tile instead of 8 x 27 dot products (3.4x fewer multiplications).
 * The input is made channels-last once (work: transposed, or computed there by the 1x1x1
 * convolution that precedes it in the feature network, Conv1), the tiles are cut into blocks
 * along k that run on pdd_parallel_for's threads, each through the kernel set's wino_block
 * (pdd_kernels.inc).
 * The weights come transformed (G w G^T on each axis) from pddnet.backends.native.conv.
 * Plain C, no Python API. */
#include <stdlib.h>
#include <string.h>

#include "pdd_head.h"

long long pdd_wino_scratch_floats(const pdd_wino *w)
{
    /* V (64, TBP, Cin), M (64, TBP, Cout), the output rows (Cout, 2, 2, 2 TB) */
    return (long long)64 * PDD_WINO_TBP * (w->Cin + w->Cout)
        + (long long)8 * PDD_WINO_TB * w->Cout;
}

static int check(const int *ints)
{
    for (int a = 0; a < 5; ++a)
        if (ints[a] < 1)
            return -1;
    return (ints[6] < 1 || ints[8] < 0) ? -1 : 0;
}

/* the channels-last input, then threads x scratch */
long long pdd_conv3_work_floats(const int *ints)
{
    pdd_wino w;
    if (check(ints) != 0)
        return -1;
    w.Cin = ints[0];
    w.Cout = ints[1];
    return (long long)ints[2] * ints[3] * ints[4] * ints[0]
        + (long long)ints[6] * (pdd_wino_scratch_floats(&w) + 16);
}

typedef struct {
    const pdd_wino *w;
    const pdd_pointwise *pw;
    const pdd_kernels *k;
    const float *X;
    float *Xc;
    float *scratch;
    long long per_thread;
    int kblocks;
} conv_job;

/* one (i, j) row of the input to channels-last: a block of nk * Cin floats */
static void transpose_item(void *ctx, long long item, int tid)
{
    const conv_job *J = (const conv_job *)ctx;
    const pdd_wino *w = J->w;
    const int nk = w->n[2], Cin = w->Cin;
    const long long plane = (long long)w->n[0] * w->n[1] * nk;
    float *dst = J->Xc + item * nk * Cin;
    (void)tid;
    for (int c = 0; c < Cin; ++c) {
        const float *src = J->X + c * plane + item * nk;
        for (int k = 0; k < nk; ++k)
            dst[(long long)k * Cin + c] = src[k];
    }
}

/* the 1x1x1 convolution before, straight into the channels-last input */
static void pointwise_item(void *ctx, long long item, int tid)
{
    const conv_job *J = (const conv_job *)ctx;
    (void)tid;
    J->k->pw_block(J->pw, item * PDD_PW_BLOCK);
}

static void block_item(void *ctx, long long item, int tid)
{
    const conv_job *J = (const conv_job *)ctx;
    const pdd_wino *w = J->w;
    const int kb = (int)(item % J->kblocks);
    const long long ij = item / J->kblocks;
    const int tj = (int)(ij % w->t[1]), ti = (int)(ij / w->t[1]);
    const int tk0 = kb * PDD_WINO_TB;
    const int tb = w->t[2] - tk0 < PDD_WINO_TB ? w->t[2] - tk0 : PDD_WINO_TB;
    J->k->wino_block(w, ti, tj, tk0, tb, J->scratch + tid * J->per_thread);
}

int pdd_conv3_winograd(const int *ints, const float *U, const float *bias, const float *Wpre,
                       const float *bpre, const float *X, float *Y, float *work)
{
    pdd_wino w;
    pdd_pointwise pw;
    conv_job J;
    int chosen = 0;
    const int threads = ints[6];
    if (check(ints) != 0 || !U || !X || !Y || !work || (ints[8] > 0 && !Wpre))
        return -1;
    /* auto: the AVX-512 set first, ~8 % faster here than AVX2 where measured (the head's
     * auto choice stays AVX2, docs/benchmarks.md) */
    J.k = pdd_pick_kernels(ints[7] < 0 && pdd_isa_available(PDD_ISA_AVX512) ? PDD_ISA_AVX512
                           : ints[7], &chosen);
    if (!J.k)
        return -3;
    w.Cin = ints[0];
    w.Cout = ints[1];
    for (int a = 0; a < 3; ++a) {
        w.n[a] = ints[2 + a];
        w.t[a] = (w.n[a] + 1) / 2;
    }
    w.relu = ints[5] != 0;
    w.U = U;
    w.bias = bias;
    w.Y = Y;
    w.Xc = work;
    J.w = &w;
    J.X = X;
    J.Xc = work;
    J.per_thread = pdd_wino_scratch_floats(&w) + 16;
    J.scratch = work + (long long)w.n[0] * w.n[1] * w.n[2] * w.Cin;
    J.kblocks = (w.t[2] + PDD_WINO_TB - 1) / PDD_WINO_TB;
    if (ints[8] > 0) {
        pw.Cin = ints[8];
        pw.Cout = w.Cin;
        pw.relu = ints[9] != 0;
        pw.nv = (long long)w.n[0] * w.n[1] * w.n[2];
        pw.W = Wpre;
        pw.bias = bpre;
        pw.X = X;
        pw.Xc = work;
        J.pw = &pw;
        pdd_parallel_for(threads, (pw.nv + PDD_PW_BLOCK - 1) / PDD_PW_BLOCK, pointwise_item, &J);
    } else {
        J.pw = NULL;
        pdd_parallel_for(threads, (long long)w.n[0] * w.n[1], transpose_item, &J);
    }
    pdd_parallel_for(threads, (long long)w.t[0] * w.t[1] * J.kblocks, block_item, &J);
    return 0;
}
