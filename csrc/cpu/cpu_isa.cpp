#include "fusedtrain/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace fusedtrain {
namespace cpu {

namespace {

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

Isa parse(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "baseline") return Isa::kBaseline;
  TORCH_CHECK(false, "fusedtrain: unknown CPU ISA '", name, "'; expected one of 'avx512', 'avx2', 'baseline'");
}

// Note [ISA override]: a process-wide dispatch switch (like ATEN_CPU_CAPABILITY), not optimizer
// state. Initialized once from FUSEDTRAIN_CPU_ISA, changed only by set_isa (tests, benchmarks).
std::atomic<int>& active() {
  static std::atomic<int> value{[] {
    const Isa best = detect();
    const char* env = std::getenv("FUSEDTRAIN_CPU_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(best);
    const Isa wanted = parse(env);
    return static_cast<int>(std::min(static_cast<int>(wanted), static_cast<int>(best)));
  }()};
  return value;
}

}  // namespace

Isa detected_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() {
  return static_cast<Isa>(active().load(std::memory_order_relaxed));
}

void set_isa(const std::string& name) {
  const Isa wanted = parse(name);
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "fusedtrain: this processor does not support ",
              name, " (best available: ", isa_name(detected_isa()), ")");
  active().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace cpu
}  // namespace fusedtrain
