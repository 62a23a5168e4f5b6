/* The kernels built for the portable path (flags in setup.py); see pdd_kernels.inc. */

#define PDD_NAME(x) x##_portable
#define PDD_ISA_LABEL "portable"
#include "pdd_kernels.inc"

