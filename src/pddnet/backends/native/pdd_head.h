/* pddnet fused head: correlation -> two mean-field steps -> softmax, expectation, entropy.
 * Plain C (no Python API); loaded by pddnet.backends.native through ctypes.
 * The spec of every step is docs/ops.md; the float64 reference is pddnet.model.ops. */
#ifndef PDD_HEAD_H
#define PDD_HEAD_H

#include <stddef.h>

#define PDD_ABI_VERSION 5

enum { PDD_ISA_PORTABLE = 0, PDD_ISA_SSE2 = 1, PDD_ISA_AVX2 = 2, PDD_ISA_AVX512 = 3 };
enum { PDD_MODE_APPROX = 0, PDD_MODE_EXACT = 1 };

/* taps of one axis: sample at position p is w0[p] * x[i0[p]] + w1[p] * x[i1[p]] */
typedef struct {
    int *i0, *i1;
    float *w0, *w1;
} pdd_taps;

typedef struct pdd_head {
    int C, n[3], G[3], L, LP, threads, mode, isa;
    long long ncp;            /* G_i G_j G_k */
    long long L3;             /* L^3 */
    /* affine pieces read from the model:
     * mfs1 input = a1 * ssd + b1; mfs2 input = a2 * ssd + c2 * mfs1 + b2; logits = s * mfs2 + t */
    float a1, b1, a2, b2, c2, s, t, pen1, pen2;
    float ex[3][64];          /* displacement values of the expectation, per axis */
    pdd_taps ctl[3];          /* control points (fixed features) */
    pdd_taps dsp[3];          /* control point + displacement, index g * L + d */
    float *A, *B;             /* two cost volumes (G^3 L^3) */
    float *F;                 /* fixed features at the control points: G^3 C */
    float *V;                 /* moving features interpolated along k: G_k C n_i n_j LP */
    float *scratch;           /* per-thread scratch */
    size_t scratch_per_thread; /* floats */
} pdd_head;

/* one 3x3x3 convolution (stride 1, zero padding 1, one group) by Winograd F(2x2x2, 3x3x3)
 * (pdd_conv.c): the output in 2x2x2 tiles, PDD_WINO_TB tiles along k per block */
#define PDD_WINO_TB 18
#define PDD_WINO_ROWS 6  /* rows of the products per step */
#define PDD_WINO_TBP ((PDD_WINO_TB + PDD_WINO_ROWS - 1) / PDD_WINO_ROWS * PDD_WINO_ROWS)
typedef struct pdd_wino {
    int Cin, Cout, n[3], t[3];  /* t: tiles per axis, (n + 1) / 2 */
    int relu;
    const float *U;             /* transformed weights (64, Cin, Cout) */
    const float *bias;          /* Cout, or NULL */
    const float *Xc;            /* the input channels-last (n_i, n_j, n_k, Cin) */
    float *Y;                   /* the output (Cout, n_i, n_j, n_k) */
} pdd_wino;

/* a 1x1x1 convolution before it (the feature network's Conv1 + ReLU), written channels-last:
 * Xc[v][o] = [relu](sum_c X[c][v] W[c][o] + b[o]) */
typedef struct pdd_pointwise {
    int Cin, Cout, relu;
    long long nv;               /* voxels */
    const float *W;             /* (Cin, Cout): the ONNX weight (Cout, Cin, 1, 1, 1) transposed */
    const float *bias;          /* Cout, or NULL */
    const float *X;             /* (Cin, nv) */
    float *Xc;                  /* (nv, Cout) */
} pdd_pointwise;
#define PDD_PW_BLOCK 48         /* voxels per block: the block's input lines stay in L1 */

typedef struct pdd_kernels {
    const char *name;
    void (*prepare)(pdd_head *h, const float *fixed, const float *moving);
    /* column gk of V: the moving features interpolated along k (every column before a slab) */
    void (*kcol)(pdd_head *h, const float *moving, int gk);
    /* one slab g_i: (correlation | min-convolution of src) -> smoothing along g_j and g_k.
     * moving != NULL: the slab's SSD from the features (V, written to ssd_out), else read src. */
    void (*slab)(pdd_head *h, int gi, const float *moving, const float *src, float *ssd_out,
                 float *dst, float a, float b, float pen, int smooth, float *scr);
    /* i-smoothing of src row (gi, gj) (all g_k), combined: out = p * base + q * smooth + r */
    void (*irow)(pdd_head *h, int gi, int gj, const float *src, float *out, const float *base,
                 float p, float q, float r, int smooth);
    /* i-smoothing of src at (gi, gj) then the softmax, expectation and entropy of each g_k */
    void (*final_row)(pdd_head *h, int gi, int gj, const float *src, float *probs, float *disp,
                      float *entropy, int smooth, float *scr);
    /* the Winograd convolution of tiles (ti, tj, tk0 .. tk0 + tb - 1), tb <= PDD_WINO_TB;
     * scr: pdd_wino_scratch_floats(w) floats */
    void (*wino_block)(const pdd_wino *w, int ti, int tj, int tk0, int tb, float *scr);
    /* the pointwise convolution of voxels [v0, v0 + PDD_PW_BLOCK) (fewer at the end) */
    void (*pw_block)(const pdd_pointwise *p, long long v0);
} pdd_kernels;

const pdd_kernels *pdd_kernels_portable(void);
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
const pdd_kernels *pdd_kernels_sse2(void);
const pdd_kernels *pdd_kernels_avx2(void);
const pdd_kernels *pdd_kernels_avx512(void);
#endif

/* the kernel set for isa (< 0: the best auto choice), its id in *chosen; NULL when this
 * CPU or build lacks it (pdd_head.c) */
const pdd_kernels *pdd_pick_kernels(int isa, int *chosen);

/* ---- the entry points (called through ctypes by pddnet.backends.native; pdd_head.c) ---- */
int pdd_abi_version(void);
int pdd_isa_available(int isa);
/* ints: C, n_i, n_j, n_k, G_i, G_j, G_k, L, mode, threads, isa (-1: the best auto choice);
 * floats: a1, b1, a2, b2, c2, s, t, pen1, pen2, then 3 L expectation values; disp: 3 L
 * normalised displacements.  NULL when out of memory, invalid or the set is unavailable. */
pdd_head *pdd_head_create(const int *ints, const float *floats, const double *disp);
void pdd_head_destroy(pdd_head *h);
int pdd_head_isa(const pdd_head *h);
int pdd_head_threads(const pdd_head *h);
size_t pdd_head_bytes(const pdd_head *h);
/* probs (G^3 L^3) and entropy (G^3) may be NULL; disp: G^3 x 3 */
int pdd_head_run(pdd_head *h, const float *fixed, const float *moving, float *probs,
                 float *disp, float *entropy);
void pdd_head_last_times(double *out);
int pdd_head_correlation(pdd_head *h, const float *fixed, const float *moving, float *out);
int pdd_head_minconv(pdd_head *h, const float *in, float *out, float pen);
int pdd_head_mean_field(pdd_head *h, const float *in, float *out, float pen);
int pdd_head_softmax(pdd_head *h, const float *cost, float *probs, float *disp, float *entropy);

/* the run-time helper every kernel set shares: fn(ctx, item) for item in [0, n) on T threads */
void pdd_parallel_for(int threads, long long n, void (*fn)(void *ctx, long long item, int tid),
                      void *ctx);

/* the grid displacements upsampled to the image grid (the head's last linear map; pdd_head.c) */
int pdd_upsample(const int *ints, const int *ptr, const int *col, const float *val,
                 const float *scale, const float *grid, float *out);

/* the `features` refinement loop in double precision (pdd_refine.c; docs/refinement.md) */
int pdd_feature_refine(const int *ints, const double *params, const double *fixed,
                       const double *moving, double *theta, double *u_out, double *out);

/* OBELISK sampling: both DeformableSample3D nodes of the features and the Sub of their results
 * in one pass (pdd_sample.c; docs/ops.md).  ints: C, n_i, n_j, n_k, S, m_i, m_j, m_k, threads;
 * X (1, C, n_i, n_j, n_k), off0/off1 (S, 3), Y (1, C S, m_i, m_j, m_k) = sample(off0) -
 * sample(off1).  Returns 0, -1 (bad arguments) or -2 (out of memory). */
int pdd_obelisk_sample(const int *ints, const float *X, const float *off0, const float *off1,
                       float *Y);

/* 3x3x3 convolution, stride 1, zero padding 1, one group, by Winograd F(2x2x2, 3x3x3)
 * (pdd_conv.c; docs/ops.md), optionally after a 1x1x1 convolution.  ints: Cin, Cout, n_i,
 * n_j, n_k, relu, threads, isa (-1: auto), Cpre (0: no 1x1x1 convolution before), relu_pre;
 * U (64, Cin, Cout): the weights transformed (pddnet.backends.native.conv); bias: Cout or
 * NULL; Wpre (Cpre, Cin) and bpre (Cin or NULL): the 1x1x1 convolution; X (1, Cpre or Cin,
 * n_i, n_j, n_k); Y (1, Cout, n_i, n_j, n_k) = [relu](conv([relu](Wpre X + bpre)) + bias);
 * work: pdd_conv3_work_floats(ints) floats the caller keeps between calls.  Returns 0, -1
 * (bad arguments), -3 (the kernel set is not available here). */
long long pdd_conv3_work_floats(const int *ints);
int pdd_conv3_winograd(const int *ints, const float *U, const float *bias, const float *Wpre,
                       const float *bpre, const float *X, float *Y, float *work);
long long pdd_wino_scratch_floats(const pdd_wino *w);

#endif
