// CPU implementations of the ops: the shared host logic (optim_host.h) driven by the CPU driver.
#include <torch/library.h>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  fusedtrain::host::register_ops<fusedtrain::cpu::Backend>(m);
}
