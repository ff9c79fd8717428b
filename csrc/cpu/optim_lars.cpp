// The 'lars' rule on the CPU trust-ratio driver (Note [trust-ratio passes] in rules_trust.h).
#include "fusedtrain/trust_cpu.h"

static const ::fusedtrain::host::RegisterRule<::fusedtrain::trust_cpu::Backend, ::fusedtrain::rules::Lars>
    fusedtrain_register_rule_lars(c10::kCPU);
