/* The kernels built for the avx512 path (flags in setup.py); see pdd_kernels.inc. */
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define PDD_NAME(x) x##_avx512
#define PDD_ISA_LABEL "avx512"
#define PDD_AVX512 1
#include "pdd_kernels.inc"
#endif
