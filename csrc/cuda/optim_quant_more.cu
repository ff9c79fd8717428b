// The 'sgd8bit', 'adagrad8bit' and 'rmsprop8bit' rules (8-bit states, Note [quantized rules] in
// rules_quant.h) on the CUDA block driver.
#include "fusedtrain/quant_cuda.cuh"

FUSEDTRAIN_REGISTER_RULE(cuda, Sgd8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Adagrad8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Rmsprop8bit, c10::kCUDA)
