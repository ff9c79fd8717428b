// The 'adam4bit' rule (4-bit states, Note [4-bit optimizer states] in quant4.h) on the CUDA block driver.
#include "fusedtrain/quant4_cuda.cuh"

FUSEDTRAIN_REGISTER_RULE(cuda, Adam4bit, c10::kCUDA)
