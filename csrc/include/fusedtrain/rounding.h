// Storage layouts of the optimizer kernels (which dtype each list holds) and the rounding of the new
// parameter into its storage type: to nearest, or stochastic for bfloat16.
//
// Note [mixed-precision layouts]:
// Register r[k] of a rule (math.h) is always the opmath type T; only loads and stores know the storage
// types. A Layout names them: list 0 (the parameter, or its float32 master copy), list 1 (the gradient),
// lists 2.. (the states, and an EMA average in the uniform layouts), and an optional extra output list, the
// low-precision parameter that receives the rounded master value in the same pass (`master_weights`).
//
// Note [stochastic rounding]:
// A bfloat16 parameter updated without a master copy loses every update smaller than half an ulp. With
// stochastic rounding the float32 result x is rounded up with probability equal to its distance from the
// lower bfloat16 neighbour, so E[round(x)] = x and small updates survive on average (Gupta et al. 2015).
// Implementation: add 16 random bits to x's bit pattern, then truncate to the upper 16 bits. The random
// bits are a hash of (seed of this step, tensor ordinal, element index), the same on CPU and CUDA; the
// hash (lowbias32, a well-mixed 32-bit integer hash) is all 32-bit integer arithmetic, so it vectorizes.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedtrain/math.h"

namespace fusedtrain {

template <typename P_, typename G_, typename St_, typename O_, bool kCopy_, bool kStochastic_>
struct Layout {
  using P = P_;    // list 0: parameter (or float32 master)
  using G = G_;    // list 1: gradient
  using St = St_;  // lists 2..: states (and the EMA average in uniform layouts)
  using O = O_;    // extra output: the low-precision parameter (kCopy)
  static constexpr bool kCopy = kCopy_;
  static constexpr bool kStochastic = kStochastic_;  // list 0 stored with stochastic rounding (bfloat16)
  static constexpr int kMaxBytes = sizeof(P) > sizeof(G) ? (sizeof(P) > sizeof(St) ? sizeof(P) : sizeof(St))
                                                          : (sizeof(G) > sizeof(St) ? sizeof(G) : sizeof(St));
};

template <typename S, bool SR = false>
using Uniform = Layout<S, S, S, S, false, SR>;

namespace rounding {

FT_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The per-tensor key of one step: mixes the step's seed with the tensor's ordinal in the call.
FT_HD uint32_t tensor_key(uint64_t seed, uint32_t tensor) {
  const uint32_t t = hash32(tensor + 0x9e3779b9u);
  return hash32(static_cast<uint32_t>(seed) ^ hash32(static_cast<uint32_t>(seed >> 32) ^ t));
}

FT_HD uint32_t random_bits(uint32_t key, int64_t index) {
  return hash32(key ^ hash32(static_cast<uint32_t>(index) ^ (static_cast<uint32_t>(index >> 32) * 0x85ebca6bu)));
}

FT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// bfloat16 from float32 with stochastic rounding (Note [stochastic rounding]). Infinities stay (their
// mantissa is zero, so the added bits are truncated away); NaN becomes the quiet NaN, as in round-to-nearest.
FT_HD c10::BFloat16 stochastic_bf16(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t r = x != x ? 0x7fc00000u : u + (bits & 0xffffu);
  return c10::BFloat16(static_cast<uint16_t>(r >> 16), c10::BFloat16::from_bits());
}

// The new parameter value into list 0's storage type.
template <class L, typename T>
FT_HD typename L::P store_param(T x, uint32_t key, int64_t index) {
  if constexpr (L::kStochastic) {
    static_assert(std::is_same_v<typename L::P, c10::BFloat16>, "stochastic rounding is for bfloat16");
    return stochastic_bf16(static_cast<float>(x), random_bits(key, index));
  } else {
    return static_cast<typename L::P>(x);
  }
}

}  // namespace rounding
}  // namespace fusedtrain
