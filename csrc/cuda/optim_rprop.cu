// The 'rprop' rule on the CUDA launcher. One translation unit per rule, so that ninja builds them in parallel.
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_torch_rest.h"

FUSEDTRAIN_REGISTER_RULE(cuda, Rprop, c10::kCUDA)
