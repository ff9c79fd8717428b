// The 'lion', 'sf_adamw' and 'sf_sgd' rules (rules_beyond.h) on the CUDA launcher; Lion on the trust-ratio driver
// (trust_cuda.cuh), whose two passes run its cautious variant.
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_beyond.h"
#include "fusedtrain/trust_cuda.cuh"

FUSEDTRAIN_REGISTER_RULE(trust_cuda, Lion, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, SfAdamw, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, SfSgd, c10::kCUDA)
