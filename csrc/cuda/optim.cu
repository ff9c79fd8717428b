// CUDA implementations of the optimizer ops: the shared host logic driven by the CUDA launcher.
#include <torch/library.h>

#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"

namespace fusedtrain {
namespace {
using cuda::Backend;
}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("sgd_", &host::sgd_impl<Backend>);
  m.impl("adagrad_", &host::adagrad_impl<Backend>);
  m.impl("rmsprop_", &host::rmsprop_impl<Backend>);
  m.impl("adam_", &host::adam_impl<Backend>);
}

}  // namespace fusedtrain
