// The kernels compiled for the baseline instruction set, and the float64 cell math.
#include <cmath>
#include <cstdint>
#include <cstring>

#define SEQFAST_ISA generic
#define SEQFAST_VBYTES 16
#define SEQFAST_MR 6
#define SEQFAST_NV 2
#include "isa_kernels_impl.h"

namespace seqfast {

KernelsF32 kernels_f32_generic() { return generic::kernels(); }

void cell_f64_fwd(int cell, const FwdChunk<double>& a) { generic::fwd<generic::OpsF64>(cell, a); }
void cell_f64_bwd(int cell, const BwdChunk<double>& a) { generic::bwd<generic::OpsF64>(cell, a); }

}  // namespace seqfast
