// pybind11 module: build and CPU-feature information, and the cached step plan (plan.cpp). No math lives
// here; the ops are reached through torch.ops.fusedtrain.* (ops.cpp).
#include <torch/extension.h>

#include <string>

#include "fusedtrain/cpu_isa.h"
#include "fusedtrain/cuda_arch.h"

#ifndef FUSEDTRAIN_VERSION
#define FUSEDTRAIN_VERSION "0.0.0"
#endif
#ifndef FUSEDTRAIN_TORCH_VERSION
#define FUSEDTRAIN_TORCH_VERSION "unknown"
#endif
#ifndef FUSEDTRAIN_CUDA_ARCHS
#define FUSEDTRAIN_CUDA_ARCHS ""
#endif
#ifndef FUSEDTRAIN_CUDA_VERSION
#define FUSEDTRAIN_CUDA_VERSION ""
#endif

namespace fusedtrain {
namespace plan {
void bind(pybind11::module& m);
}  // namespace plan
}  // namespace fusedtrain

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtrain compiled library: build information (ops live in torch.ops.fusedtrain)";
  m.def("version", [] { return std::string(FUSEDTRAIN_VERSION); });
  m.def("built_with_torch", [] { return std::string(FUSEDTRAIN_TORCH_VERSION); });
  m.def("has_cuda", [] {
#ifdef FUSEDTRAIN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", [] { return std::string(FUSEDTRAIN_CUDA_ARCHS); });
  m.def("cuda_version", [] { return std::string(FUSEDTRAIN_CUDA_VERSION); });
  m.def("cuda_arch_coverage", [](const std::string& arch_list, int major, int minor) {
    switch (fusedtrain::cuda_arch::coverage(arch_list, major, minor)) {
      case fusedtrain::cuda_arch::Coverage::kCubin: return std::string("cubin");
      case fusedtrain::cuda_arch::Coverage::kPtx: return std::string("ptx");
      default: return std::string("none");
    }
  });
  m.def("describe_cuda_archs", &fusedtrain::cuda_arch::describe);
#ifdef FUSEDTRAIN_WITH_CUDA
  m.def("check_cuda_device", [](int index) { fusedtrain::cuda::check_device_arch(c10::Device(c10::kCUDA, index)); });
#endif
  m.def("cpu_isa_detected", [] { return fusedtrain::cpu::isa_name(fusedtrain::cpu::detected_isa()); });
  m.def("cpu_isa", [] { return fusedtrain::cpu::isa_name(fusedtrain::cpu::active_isa()); });
  m.def("set_cpu_isa", &fusedtrain::cpu::set_isa, "Select the SIMD copy of the CPU loops (tests, benchmarks)");
  fusedtrain::plan::bind(m);
}
