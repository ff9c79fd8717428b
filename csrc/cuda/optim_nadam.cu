// The 'nadam' rule on the CUDA launcher. One translation unit per rule, so that ninja builds them in parallel.
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"

FUSEDTRAIN_REGISTER_RULE(cuda, Nadam, c10::kCUDA)
