// The kernels for AVX-512, chosen at run time when the CPU has it.
#include <cstdint>
#include <cstring>

#include "isa_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
#define SEQFAST_ISA avx512
#define SEQFAST_VBYTES 64
#define SEQFAST_MR 12
#define SEQFAST_NV 2
#include "isa_kernels_impl.h"

namespace seqfast {
IsaKernels kernels_avx512() { return avx512::kernels(); }
}  // namespace seqfast
#else
namespace seqfast {
IsaKernels kernels_avx512() { return kernels_generic(); }
}  // namespace seqfast
#endif
