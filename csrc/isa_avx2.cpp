// The kernels for AVX2 + FMA, chosen at run time when the CPU has them.
#include <cstdint>
#include <cstring>

#include "isa_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define SEQFAST_ISA avx2
#define SEQFAST_VBYTES 32
#define SEQFAST_MR 6
#define SEQFAST_NV 2
#include "isa_kernels_impl.h"

namespace seqfast {
IsaKernels kernels_avx2() { return avx2::kernels(); }
}  // namespace seqfast
#else
namespace seqfast {
IsaKernels kernels_avx2() { return kernels_generic(); }
}  // namespace seqfast
#endif
