// Which GPUs a build can run on, and the clear error when it cannot (instead of CUDA's "no kernel image").
//
// Note [CUDA architecture check]:
// The build records the architectures it compiled (FUSEDTRAIN_CUDA_ARCHS, the canonical TORCH_CUDA_ARCH_LIST
// setup.py derives from nvcc's -gencode flags, e.g. "7.5;8.0;9.0+PTX"). Every CUDA entry point calls
// cuda::check_device_arch(device) before its first launch: it asks the CUDA runtime whether a probe kernel,
// compiled with the same -gencode flags as every other kernel, has an image for the device
// (cudaFuncGetAttributes; the runtime JIT-compiles PTX there if it must), and caches the answer per device.
// When there is none it raises an error naming the device, its compute capability, the compiled
// architectures and the rebuild command; coverage() (a pure function, tested on the CPU) tells apart
// "this build lacks the architecture" from "the PTX is there but the driver cannot compile it".
#pragma once

#include <c10/core/Device.h>

#include <string>
#include <vector>

namespace fusedtrain {
namespace cuda_arch {

// One entry of a TORCH_CUDA_ARCH_LIST: "8.6" (a cubin for sm_86), "9.0+PTX" (cubin and PTX of compute_90),
// "9.0a" (an architecture-specific cubin: sm_90 only), "10.0f" (family-specific: 10.x, x >= 0).
struct Target {
  int major = 0;
  int minor = 0;
  char variant = 0;  // 0, 'a' or 'f'
  bool ptx = false;
};

// Parses a list separated by ';' or spaces; throws c10::Error naming a malformed entry.
std::vector<Target> parse(const std::string& arch_list);

enum class Coverage { kCubin, kPtx, kNone };

// How a device of compute capability major.minor runs a build of `arch_list`. CUDA's compatibility rules:
// a cubin for X.Y runs on X.Z with Z >= Y (an 'a' cubin on X.Y only, an 'f' cubin like a plain one);
// PTX for X.Y is JIT-compiled by the driver for any X'.Y' >= X.Y ('a' PTX: X.Y only, 'f' PTX: X.Z, Z >= Y).
Coverage coverage(const std::string& arch_list, int major, int minor);

// "sm_75, sm_80 and PTX for compute_90 (JIT for 9.0 and newer)": what a list gives, for messages.
std::string describe(const std::string& arch_list);

}  // namespace cuda_arch

#ifdef FUSEDTRAIN_WITH_CUDA
namespace cuda {
// Throws a c10::Error naming the device, the build's architectures and the rebuild command when this build has
// no kernel image the device can run; a cached no-op after the first success per device.
void check_device_arch(const c10::Device& device);
}  // namespace cuda
#endif

}  // namespace fusedtrain
