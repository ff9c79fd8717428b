// The 'sf_adamw8bit' rule (Schedule-Free AdamW, z float, exp_avg_sq 8-bit: rules_sf_quant.h) on the CPU block
// driver.
#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rules_sf_quant.h"

FUSEDTRAIN_REGISTER_RULE(cpu, SfAdamw8bit, c10::kCPU)
