// The 'lion', 'sf_adamw' and 'sf_sgd' rules (rules_beyond.h) on the CUDA launcher.
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_beyond.h"

FUSEDTRAIN_REGISTER_RULE(cuda, Lion, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, SfAdamw, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, SfSgd, c10::kCUDA)
