// CPU implementations of the optimizer ops: the shared host logic driven by the CPU multi-tensor driver.
#include <torch/library.h>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"

namespace fusedtrain {
namespace {
using cpu::Backend;
}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("sgd_", &host::sgd_impl<Backend>);
  m.impl("adagrad_", &host::adagrad_impl<Backend>);
  m.impl("rmsprop_", &host::rmsprop_impl<Backend>);
  m.impl("adam_", &host::adam_impl<Backend>);
}

}  // namespace fusedtrain
