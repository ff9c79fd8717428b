// CUDA implementations of the ops: the shared host logic (optim_host.h) driven by the CUDA launcher.
#include <torch/library.h>

#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  fusedtrain::host::register_ops<fusedtrain::cuda::Backend>(m);
}
