// The 'lars8bit' and 'lamb8bit' rules (8-bit states, Note [quantized trust passes] in rules_trust_quant.h) on
// the CUDA trust-ratio and block drivers.
#include "fusedtrain/trust_quant_cuda.cuh"

FUSEDTRAIN_REGISTER_RULE(trust_quant_cuda, Lars8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(trust_quant_cuda, Lamb8bit, c10::kCUDA)
