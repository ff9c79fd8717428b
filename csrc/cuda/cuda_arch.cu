// The run-time half of the CUDA architecture check (Note [CUDA architecture check] in cuda_arch.h).
// Only c10 headers (no ATen): nvcc parses the whole unit once per architecture, so it stays light.
#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "fusedtrain/cuda_arch.h"

#ifndef FUSEDTRAIN_CUDA_ARCHS
#define FUSEDTRAIN_CUDA_ARCHS ""
#endif

namespace fusedtrain {
namespace cuda {
namespace {

// Compiled with the same -gencode flags as every kernel of the library: it has an image for a device
// exactly when they all do. Never launched.
__global__ void arch_probe_kernel() {}

std::string rebuild_hint(int major, int minor) {
  std::string archs = FUSEDTRAIN_CUDA_ARCHS;
  return "rebuild fusedtrain for it, e.g. TORCH_CUDA_ARCH_LIST=\"" + std::to_string(major) + "." +
         std::to_string(minor) + "\" pip install --no-build-isolation -e . (or add it to the list: \"" + archs +
         "\"); the default list, without TORCH_CUDA_ARCH_LIST, covers compute capability 7.5 and newer.";
}

}  // namespace

void check_device_arch(const c10::Device& device) {
  TORCH_CHECK(device.is_cuda(), "fusedtrain: check_device_arch needs a CUDA device, got ", device);
  const int index = device.has_index() ? device.index() : static_cast<int>(c10::cuda::current_device());
  TORCH_CHECK(index >= 0 && index < C10_COMPILE_TIME_MAX_GPUS, "fusedtrain: CUDA device index ", index,
              " out of range");
  // A fact about (this library, this device) that cannot change while the process lives: caching it is
  // not the optimizer state the house rules keep out of C++ globals. Failures are not cached (the call
  // throws every time, at the same cost as the first).
  static std::array<std::atomic<bool>, C10_COMPILE_TIME_MAX_GPUS> known_good{};
  if (known_good[index].load(std::memory_order_acquire)) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, arch_probe_kernel);
  if (err == cudaSuccess) {
    known_good[index].store(true, std::memory_order_release);
    return;
  }
  (void)cudaGetLastError();  // the failed query must not surface as the error of torch's next launch check
  cudaDeviceProp prop;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  const int major = prop.major, minor = prop.minor;
  const std::string archs = FUSEDTRAIN_CUDA_ARCHS;
  const std::string where = std::string("fusedtrain: cuda:") + std::to_string(index) + " (" + prop.name +
                            ", compute capability " + std::to_string(major) + "." + std::to_string(minor) + ")";
  const std::string built = "this build has " + cuda_arch::describe(archs) + " (TORCH_CUDA_ARCH_LIST=\"" + archs +
                            "\", compiled with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                            std::to_string(CUDART_VERSION % 1000 / 10) + ")";
  TORCH_CHECK(major >= 7, where,
              " is too old: fusedtrain's CUDA kernels need compute capability 7.0 or newer (kernel parameters "
              "over 4 KB); use the CPU kernels.");
  switch (cuda_arch::coverage(archs, major, minor)) {
    case cuda_arch::Coverage::kNone:
      TORCH_CHECK(false, where, " cannot run this build's CUDA kernels: ", built, "; ", rebuild_hint(major, minor));
      break;
    case cuda_arch::Coverage::kPtx:
      TORCH_CHECK(false, where, " has no cubin in this build, and the driver could not JIT-compile its PTX (",
                  cudaGetErrorString(err), "): ", built, ". Update the NVIDIA driver to one that supports CUDA ",
                  CUDART_VERSION / 1000, ".", CUDART_VERSION % 1000 / 10, " (CUDA 13 needs R580 or newer), or ",
                  rebuild_hint(major, minor));
      break;
    case cuda_arch::Coverage::kCubin:
      TORCH_CHECK(false, where, " could not load this build's CUDA kernels although ", built,
                  " should cover it: ", cudaGetErrorString(err), ". Is the NVIDIA driver older than the CUDA "
                  "toolkit the build used?");
      break;
  }
}

}  // namespace cuda
}  // namespace fusedtrain
