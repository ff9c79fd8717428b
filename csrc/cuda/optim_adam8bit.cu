// The 'adam8bit' rule (8-bit states, Note [quantized rules] in rules_quant.h) on the CUDA block driver.
#include "fusedtrain/quant_cuda.cuh"

FUSEDTRAIN_REGISTER_RULE(cuda, Adam8bit, c10::kCUDA)
