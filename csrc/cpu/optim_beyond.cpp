// The 'lion', 'sf_adamw' and 'sf_sgd' rules (rules_beyond.h) on the CPU driver; Lion on the trust-ratio driver
// (trust_cpu.h), whose two passes run its cautious variant.
#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/rules_beyond.h"
#include "fusedtrain/trust_cpu.h"

FUSEDTRAIN_REGISTER_RULE(trust_cpu, Lion, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, SfAdamw, c10::kCPU)
FUSEDTRAIN_REGISTER_RULE(cpu, SfSgd, c10::kCPU)
