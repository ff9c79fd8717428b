// The 'lamb' rule on the CUDA trust-ratio driver (Note [trust-ratio passes] in rules_trust.h).
#include "fusedtrain/trust_cuda.cuh"

static const ::fusedtrain::host::RegisterRule<::fusedtrain::trust_cuda::Backend, ::fusedtrain::rules::Lamb>
    fusedtrain_register_rule_lamb(c10::kCUDA);
