// The 'sf_adamw8bit' rule (Schedule-Free AdamW, z float, exp_avg_sq 8-bit: rules_sf_quant.h) on the CUDA block
// driver.
#include "fusedtrain/quant_cuda.cuh"
#include "fusedtrain/rules_sf_quant.h"

FUSEDTRAIN_REGISTER_RULE(cuda, SfAdamw8bit, c10::kCUDA)
