// The CPU block driver of the 4-bit rules (Note [4-bit optimizer states] in quant4.h): the 8-bit driver's
// structure (Note [CPU block split] in quant_cpu.h: blocks laid end to end over one parallel_for, a block
// never split, one function per ISA picked at run time) with blocks of kBlock4 elements and packed codes.
//
// Note [4-bit block loops]:
// Per block, every loop vectorizes (check with -fopt-info-vec-optimized on optim_adam4bit.cpp):
//  - unpack: the bytes' low and high nibbles into an int32 code per element (a strided store);
//  - decode: value = map[code] * absmax through the 16-entry table held in two vector registers (a
//    two-register shuffle: vpermps on AVX2; with a table gather, emulated by GCC, the step took 19.7 cycles
//    per element on one thread instead of 16.6, benchmarks/NOTES.md "4-bit optimizer states");
//  - the rule's functor, as in quant_cpu.h's block_body;
//  - absmax: the integer max of the float bit patterns with the sign cleared (a NaN wins, Note [vectorized
//    block loops] in quant_cpu.h);
//  - encode: the count of the 15 midpoints below x (quant4.h's encode4: compares against constants held in
//    registers, no gather), then pack pairs of codes into bytes (an odd tail's last high nibble is 0).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/quant4.h"
#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules_quant4.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace quant {
namespace cpu4_impl {

// Eight float32 lanes and their int32 indices (GCC vector extensions: one AVX2 register each).
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

// One block of n (<= kBlock4) elements starting at element e0 = b * kBlock4 of its tensor (even, so the
// block owns whole bytes). ptr: the tuple's lists (param, grad, (codes, absmax) per state, copy).
template <class L, typename Op>
inline __attribute__((always_inline)) void block_body4(void* const* ptr, int64_t b, int64_t n, const Op& op_in,
                                                       uint32_t key, const Signs& sgn) {
  using T = at::opmath_type<typename L::P>;
  using Bits = cpu_impl::BitsOf<T>;
  constexpr int D = Op::depth, S = D - 2;
  const Op op = op_in;
  const int64_t e0 = b * kBlock4;
  const int64_t nb = (n + 1) / 2;  // bytes of this block
  typename L::P* __restrict__ p = static_cast<typename L::P*>(ptr[0]) + e0;
  const typename L::G* __restrict__ g = static_cast<const typename L::G*>(ptr[1]) + e0;
  typename L::O* __restrict__ out = L::kCopy ? static_cast<typename L::O*>(ptr[2 + 2 * S]) + e0 : nullptr;
  T st[S > 0 ? S : 1][kBlock4];
  alignas(32) int32_t code[kBlock4];
  const int64_t n8 = (n + 7) & ~int64_t(7);  // whole vectors of 8 (<= kBlock4)
  for (int s = 0; s < S; ++s) {
    const float absmax = static_cast<const float*>(ptr[3 + 2 * s])[b];
    const uint8_t* __restrict__ c = static_cast<const uint8_t*>(ptr[2 + 2 * s]) + e0 / 2;
    for (int64_t k = 0; k < nb; ++k) {
      code[2 * k] = c[k] & 15;
      code[2 * k + 1] = c[k] >> 4;
    }
    for (int64_t i = 2 * nb; i < n8; ++i) code[i] = 0;  // a tail's lanes past n (decoded, never used)
    // Note [4-bit block loops]: the 16-entry table as two vectors of 8, looked up by a two-register shuffle
    // (AVX2: two vpermps and a blend, no gather); the same values as table[code]
    const float* table = sgn[s] ? kMaps4.signed_value : kMaps4.unsigned_value;
    F8 lo, hi;
    __builtin_memcpy(&lo, table, sizeof(F8));
    __builtin_memcpy(&hi, table + 8, sizeof(F8));
    T* __restrict__ x = st[s];
    for (int64_t i = 0; i < n8; i += 8) {
      I8 k;
      __builtin_memcpy(&k, code + i, sizeof(I8));
      F8 v = __builtin_shuffle(lo, hi, k) * absmax;
      if (!sgn[s]) v = v * v;  // Note [square-root states] (rules_quant.h): the codes hold sqrt(state)
      for (int j = 0; j < 8; ++j) x[i + j] = static_cast<T>(v[j]);
    }
  }
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    T r[D];
    r[0] = static_cast<T>(p[i]);
    r[1] = static_cast<T>(g[i]);
    for (int s = 0; s < S; ++s) r[2 + s] = st[s][i];
    op(r);
    p[i] = rounding::store_param<L>(r[0], key, e0 + i);
    for (int s = 0; s < S; ++s) st[s][i] = r[2 + s];
    if constexpr (L::kCopy) out[i] = static_cast<typename L::O>(r[0]);
  }
  for (int s = 0; s < S; ++s) {
    T* __restrict__ x = st[s];
    if (!sgn[s]) {
      for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);  // Note [square-root states]
    }
    Bits top = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Bits bits = __builtin_bit_cast(Bits, x[i]) & std::numeric_limits<Bits>::max();
      top = bits > top ? bits : top;
    }
    const float absmax = static_cast<float>(__builtin_bit_cast(T, top));
    static_cast<float*>(ptr[3 + 2 * s])[b] = absmax;
    const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
    const float* mid = sgn[s] ? kMaps4.signed_mid : kMaps4.unsigned_mid;
    T m[15];
    for (int k = 0; k < 15; ++k) m[k] = static_cast<T>(mid[k]);
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i] * inv;
      int c = 0;
#pragma GCC unroll 15
      for (int k = 0; k < 15; ++k) c += m[k] < v ? 1 : 0;  // quant4.h's encode4
      code[i] = c;
    }
    if (n & 1) code[n] = 0;  // the unused high nibble of an odd tail
    uint8_t* __restrict__ c = static_cast<uint8_t*>(ptr[2 + 2 * s]) + e0 / 2;
    for (int64_t k = 0; k < nb; ++k) c[k] = static_cast<uint8_t>(code[2 * k] | (code[2 * k + 1] << 4));
  }
}

template <class L, typename Op>
using BlockFn = void (*)(void* const*, int64_t, int64_t, const Op&, uint32_t, const Signs&);

#ifdef FT_HAVE_X86_DISPATCH
template <class L, typename Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void block4_avx512(
    void* const* ptr, int64_t b, int64_t n, const Op& op, uint32_t key, const Signs& sgn) {
  block_body4<L, Op>(ptr, b, n, op, key, sgn);
}
template <class L, typename Op>
__attribute__((target("avx2,fma,f16c"))) void block4_avx2(void* const* ptr, int64_t b, int64_t n, const Op& op,
                                                           uint32_t key, const Signs& sgn) {
  block_body4<L, Op>(ptr, b, n, op, key, sgn);
}
#endif
template <class L, typename Op>
void block4_baseline(void* const* ptr, int64_t b, int64_t n, const Op& op, uint32_t key, const Signs& sgn) {
  block_body4<L, Op>(ptr, b, n, op, key, sgn);
}

template <class L, typename Op>
BlockFn<L, Op> select_block4() {
#ifdef FT_HAVE_X86_DISPATCH
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return &block4_avx512<L, Op>;
    case cpu::Isa::kAvx2:
      return &block4_avx2<L, Op>;
    default:
      break;
  }
#endif
  return &block4_baseline<L, Op>;
}

}  // namespace cpu4_impl

template <>
struct Driver4<cpu::Backend> {
  // Note [CPU block split] (quant_cpu.h), with blocks of kBlock4 elements.
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Signs& sgn) {
    constexpr int S = Op::depth - 2;
    if constexpr (2 + 2 * S + (L::kCopy ? 1 : 0) > kMaxDepth || S > kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      const std::vector<int64_t> offset = cpu::cumulative(work, [](int64_t numel) { return num_blocks4(numel); });
      const int64_t total = offset.back();  // in blocks
      if (total == 0) return;
      const cpu4_impl::BlockFn<L, Op> fn = cpu4_impl::select_block4<L, Op>();
      const uint64_t seed = L::kStochastic ? read_seed(work.scalars) : 0;
      at::parallel_for(0, total, cpu::kGrain / kBlock4, [&](int64_t begin, int64_t end) {
        cpu::Rebound<Op> rebound(op);
        cpu::for_each_piece(offset, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
          const Op& bound = rebound.for_tensor(work, i);
          const uint32_t key = L::kStochastic ? rounding::tensor_key(seed, work.ordinal[i]) : 0u;
          void* const* ptr = work.ptr[i].data();
          for (int64_t b = lo; b < hi; ++b) {
            fn(ptr, b, std::min<int64_t>(kBlock4, work.numel[i] - b * kBlock4), bound, key, sgn);
          }
        });
      });
    }
  }
};

}  // namespace quant
}  // namespace fusedtrain
