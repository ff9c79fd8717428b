// The 'nadam8bit', 'radam8bit', 'adamax8bit', 'adadelta8bit' and 'lion8bit' rules (8-bit states, Note
// [quantized rules] in rules_quant.h) on the CPU block driver.
#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rules_quant_more.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Nadam8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Radam8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Adamax8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Adadelta8bit, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, Lion8bit, c10::kCPU)
