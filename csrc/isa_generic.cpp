// The kernels compiled for the baseline instruction set.
#include <cstdint>
#include <cstring>

#define SEQFAST_ISA generic
#define SEQFAST_VBYTES 16
#define SEQFAST_MR 6
#define SEQFAST_NV 2
#include "isa_kernels_impl.h"

namespace seqfast {

IsaKernels kernels_generic() { return generic::kernels(); }

}  // namespace seqfast
