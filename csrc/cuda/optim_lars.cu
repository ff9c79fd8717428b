// The 'lars' rule on the CUDA trust-ratio driver (Note [trust-ratio passes] in rules_trust.h).
#include "fusedtrain/trust_cuda.cuh"

static const ::fusedtrain::host::RegisterRule<::fusedtrain::trust_cuda::Backend, ::fusedtrain::rules::Lars>
    fusedtrain_register_rule_lars(c10::kCUDA);
