/* The kernels built for the sse2 path (flags in setup.py); see pdd_kernels.inc. */
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define PDD_NAME(x) x##_sse2
#define PDD_ISA_LABEL "sse2"
#define PDD_SSE2 1
#include "pdd_kernels.inc"
#endif
