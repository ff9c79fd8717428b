// The 'adam4bit' rule (4-bit states, Note [4-bit optimizer states] in quant4.h) on the CPU block driver.
#include "fusedtrain/quant4_cpu.h"

FUSEDTRAIN_REGISTER_RULE(cpu, Adam4bit, c10::kCPU)
