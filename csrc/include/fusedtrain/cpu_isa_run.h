// run_on_isa<K>(args...): K::run(args...) compiled for AVX-512, AVX2+FMA and the baseline ISA, the copy for
// the active ISA picked at run time (Note [CPU SIMD dispatch] in cpu_driver.h). K::run's body must be
// always_inline (or a template instantiated here) so that each copy is compiled, and vectorized, for its
// target. For kernels with one entry point; drivers with several (Adafactor's regions) keep a table.
#pragma once

#include "fusedtrain/cpu_isa.h"

namespace fusedtrain {
namespace cpu {
namespace isa_copies {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FT_ISA_RUN_X86 1
template <class K, class... A>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void on_avx512(A... a) {
  K::run(a...);
}
template <class K, class... A>
__attribute__((target("avx2,fma,f16c"))) void on_avx2(A... a) {
  K::run(a...);
}
#endif
template <class K, class... A>
void on_baseline(A... a) {
  K::run(a...);
}

}  // namespace isa_copies

template <class K, class... A>
void run_on_isa(A... a) {
#ifdef FT_ISA_RUN_X86
  switch (active_isa()) {
    case Isa::kAvx512:
      isa_copies::on_avx512<K>(a...);
      return;
    case Isa::kAvx2:
      isa_copies::on_avx2<K>(a...);
      return;
    default:
      break;
  }
#endif
  isa_copies::on_baseline<K>(a...);
}

}  // namespace cpu
}  // namespace fusedtrain
