// The 'nadam8bit', 'radam8bit', 'adamax8bit', 'adadelta8bit' and 'lion8bit' rules (8-bit states, Note
// [quantized rules] in rules_quant.h) on the CUDA block driver.
#include "fusedtrain/quant_cuda.cuh"
#include "fusedtrain/rules_quant_more.h"

FUSEDTRAIN_REGISTER_RULE(cuda, Nadam8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Radam8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Adamax8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Adadelta8bit, c10::kCUDA)
FUSEDTRAIN_REGISTER_RULE(cuda, Lion8bit, c10::kCUDA)
