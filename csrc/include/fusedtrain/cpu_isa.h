// Which SIMD copy of the CPU inner loop runs (see Note [CPU SIMD dispatch] in cpu_driver.h).
#pragma once

#include <string>

namespace fusedtrain {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this processor supports (and the build can use).
Isa detected_isa();
// The ISA in use: the detected one, or a lower one chosen with set_isa / FUSEDTRAIN_CPU_ISA.
Isa active_isa();
// Selects a copy by name ("avx512", "avx2", "baseline"); throws if the processor lacks it.
void set_isa(const std::string& name);
std::string isa_name(Isa isa);

}  // namespace cpu
}  // namespace fusedtrain
