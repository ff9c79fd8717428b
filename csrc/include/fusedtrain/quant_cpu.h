// The CPU block driver of the quantized rules (Note [quantized rules] in rules_quant.h).
//
// Note [CPU block split]:
// As Note [CPU work split] (cpu_driver.h), with blocks (of up to quant::kBlock elements of one row, Note
// [row blocks] in quant.h) in place of elements:
// the blocks of all tensors of a call are laid end to end, one at::parallel_for region splits them into
// equal ranges, and a block is never split (its absmax depends on all its elements). Per block, four
// loops over at most 256 elements, each compiled for the ISA picked at run time like loop_body:
// dequantize the states into a stack buffer (opmath type), run the rule's functor on (param, grad,
// states) and store the parameter, take each state's absmax, requantize (Note [closed-form encoder]); every
// loop vectorizes (Note [vectorized block loops]).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fusedtrain/cpu_driver.h"
#include "fusedtrain/quant.h"
#include "fusedtrain/rounding.h"
#include "fusedtrain/rules_quant.h"
#include "fusedtrain/work.h"

namespace fusedtrain {
namespace quant {
namespace cpu_impl {

// Note [closed-form encoder]:
// The binary search of quant.h costs 8 (unsigned) or 7 (signed) dependent table gathers per value, which
// makes the CPU step compute-bound. Both maps are one lattice: decade e (values 10^(e-6) * (0.1 + 0.9 j / F_e),
// F_e = 2^(e+1) unsigned, 2^e signed) starts at code base_e = F_e - 1, and consecutive decades have
// consecutive codes (the top entry 1 is decade 7's first, 0 sits below decade 0 / 1). So the decade comes from
// six comparisons with 10^-6 .. 10^-1 (selects, no gather), the nearest lattice index from
// j = round((x 10^(6-e) - 0.1) F_e / 0.9), and the estimate c0 = base_e + j is the nearest code or one of its
// neighbours (rounding near a midpoint or a decade edge). One comparison with each neighbouring midpoint
// settles it: c = c0 + [mid[c0] < x] - [mid[c0-1] >= x], exactly the binary search's count of midpoints
// below x (test_optim_8bit.py checks codes at and around every midpoint against it). Two gathers per value.
template <typename T, bool kSigned>
inline __attribute__((always_inline)) int encode_closed(T x, const float* mid) {
  constexpr int kTop = kSigned ? 127 : 255;
  const int e = (kSigned ? 1 : (x >= T(1e-6) ? 1 : 0)) + (x >= T(1e-5) ? 1 : 0) + (x >= T(1e-4) ? 1 : 0) +
                (x >= T(1e-3) ? 1 : 0) + (x >= T(1e-2) ? 1 : 0) + (x >= T(1e-1) ? 1 : 0);
  T scale = kSigned ? T(1e5) : T(1e6);  // 10^(6-e)
  scale = x >= T(1e-6) ? T(1e5) : scale;
  scale = x >= T(1e-5) ? T(1e4) : scale;
  scale = x >= T(1e-4) ? T(1e3) : scale;
  scale = x >= T(1e-3) ? T(1e2) : scale;
  scale = x >= T(1e-2) ? T(1e1) : scale;
  scale = x >= T(1e-1) ? T(1) : scale;
  const int f = kSigned ? (1 << e) : (2 << e);
  T j = (x * scale - T(0.1)) * (static_cast<T>(f) * T(1.0 / 0.9)) + T(0.5);
  j = j > T(-2) ? j : T(-2);  // also NaN: the conversion below stays defined
  j = j < T(300) ? j : T(300);
  int c = f - 1 + static_cast<int>(std::floor(j));
  c = c < 1 ? 1 : (c > kTop - 1 ? kTop - 1 : c);
  c += (static_cast<T>(mid[c]) < x ? 1 : 0) - (static_cast<T>(mid[c - 1]) >= x ? 1 : 0);
  return x > T(0) ? c : 0;
}

// Note [vectorized block loops]:
// Every loop of block_body compiles to AVX2 / AVX-512 vector code (check with -fopt-info-vec-optimized on
// optim_adam8bit.cpp; a scalar loop here made the step ~30x slower than the float32 step):
//  - decoding reads one 256-entry float table per map indexed by the code's byte (kSignedByByte holds the
//    signed map at byte (uint8_t)code, so both maps gather through a zero-extended 32-bit index; the same
//    values as quant.h's decode_signed: negation is exact);
//  - the block's absmax is an integer max of the float bit patterns with the sign bit cleared: for
//    non-negative floats the bit order is the value order, and every NaN pattern lies above +inf, so a NaN
//    anywhere in the block wins the max (Note [8-bit optimizer states]: a diverged block stays visible)
//    without a separate flag;
//  - encoding writes int32 codes into a local buffer (the closed form of Note [closed-form encoder]), then
//    narrows them into the byte codes in a second loop.
inline constexpr std::array<float, 256> make_signed_by_byte() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int c = b < 128 ? b : b - 256;
    const float v = kMaps.signed_value[c < 0 ? (c == -128 ? 127 : -c) : c];
    t[b] = c < 0 ? -v : v;
  }
  return t;
}
inline constexpr std::array<float, 256> kSignedByByte = make_signed_by_byte();

template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

// Block b (its absmax index) of its tensor: n (<= kBlock) elements starting at element e0 (Note [row blocks]
// in quant.h). ptr: the tuple's lists (param, grad, (codes, absmax) per state, copy).
template <class L, typename Op>
inline __attribute__((always_inline)) void block_body(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                      const Op& op_in, uint32_t key, const Signs& sgn) {
  using T = at::opmath_type<typename L::P>;
  using Bits = BitsOf<T>;
  constexpr int D = Op::depth, S = D - 2;
  const Op op = op_in;
  typename L::P* __restrict__ p = static_cast<typename L::P*>(ptr[0]) + e0;
  const typename L::G* __restrict__ g = static_cast<const typename L::G*>(ptr[1]) + e0;
  typename L::O* __restrict__ out = L::kCopy ? static_cast<typename L::O*>(ptr[2 + 2 * S]) + e0 : nullptr;
  T st[S > 0 ? S : 1][kBlock];
  for (int s = 0; s < S; ++s) {
    const float absmax = static_cast<const float*>(ptr[3 + 2 * s])[b];
    const uint8_t* __restrict__ c = static_cast<const uint8_t*>(ptr[2 + 2 * s]) + e0;
    T* __restrict__ x = st[s];
    if (sgn[s]) {
      const float* __restrict__ table = kSignedByByte.data();
      for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(table[c[i]] * absmax);
    } else {  // Note [square-root states] (rules_quant.h): the codes hold sqrt(state)
      const float* __restrict__ table = kMaps.unsigned_value;
      for (int64_t i = 0; i < n; ++i) {
        const float root = table[c[i]] * absmax;
        x[i] = static_cast<T>(root * root);
      }
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
  int32_t code[kBlock];
  for (int s = 0; s < S; ++s) {
    T* __restrict__ x = st[s];
    if (!sgn[s]) {
      for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);  // Note [square-root states]
    }
    Bits top = 0;  // Note [vectorized block loops]: max of |x| as bits; a NaN wins
    for (int64_t i = 0; i < n; ++i) {
      const Bits bits = __builtin_bit_cast(Bits, x[i]) & std::numeric_limits<Bits>::max();
      top = bits > top ? bits : top;
    }
    const float absmax = static_cast<float>(__builtin_bit_cast(T, top));
    static_cast<float*>(ptr[3 + 2 * s])[b] = absmax;
    const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
    // Note [closed-form encoder]: the same codes as quant.h's encode_signed / encode_unsigned
    if (sgn[s]) {
      for (int64_t i = 0; i < n; ++i) {
        const T v = x[i] * inv;
        const int a = encode_closed<T, true>(v < T(0) ? -v : v, kMaps.signed_mid);
        code[i] = v < T(0) ? -a : a;
      }
      int8_t* __restrict__ c = static_cast<int8_t*>(ptr[2 + 2 * s]) + e0;
      for (int64_t i = 0; i < n; ++i) c[i] = static_cast<int8_t>(code[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) code[i] = encode_closed<T, false>(x[i] * inv, kMaps.unsigned_mid);
      uint8_t* __restrict__ c = static_cast<uint8_t*>(ptr[2 + 2 * s]) + e0;
      for (int64_t i = 0; i < n; ++i) c[i] = static_cast<uint8_t>(code[i]);
    }
  }
}

template <class L, typename Op>
using BlockFn = void (*)(void* const*, int64_t, int64_t, int64_t, const Op&, uint32_t, const Signs&);

#ifdef FT_HAVE_X86_DISPATCH
template <class L, typename Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void block_avx512(
    void* const* ptr, int64_t b, int64_t e0, int64_t n, const Op& op, uint32_t key, const Signs& sgn) {
  block_body<L, Op>(ptr, b, e0, n, op, key, sgn);
}
template <class L, typename Op>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                          const Op& op, uint32_t key, const Signs& sgn) {
  block_body<L, Op>(ptr, b, e0, n, op, key, sgn);
}
#endif
template <class L, typename Op>
void block_baseline(void* const* ptr, int64_t b, int64_t e0, int64_t n, const Op& op, uint32_t key,
                    const Signs& sgn) {
  block_body<L, Op>(ptr, b, e0, n, op, key, sgn);
}

template <class L, typename Op>
BlockFn<L, Op> select_block() {
#ifdef FT_HAVE_X86_DISPATCH
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return &block_avx512<L, Op>;
    case cpu::Isa::kAvx2:
      return &block_avx2<L, Op>;
    default:
      break;
  }
#endif
  return &block_baseline<L, Op>;
}

}  // namespace cpu_impl

template <>
struct Driver<cpu::Backend> {
  // Note [CPU block split]. Bound per tensor as multi_tensor_apply binds (Note [per-tensor binding]).
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Signs& sgn) {
    constexpr int S = Op::depth - 2;
    if constexpr (2 + 2 * S + (L::kCopy ? 1 : 0) > kMaxDepth || S > kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      std::vector<int64_t> offset(work.size() + 1, 0);  // in blocks (Note [row blocks] in quant.h)
      for (size_t i = 0; i < work.size(); ++i) offset[i + 1] = offset[i] + tensor_blocks(work.numel[i], work.row[i]);
      const int64_t total = offset.back();
      if (total == 0) return;
      const cpu_impl::BlockFn<L, Op> fn = cpu_impl::select_block<L, Op>();
      const uint64_t seed = L::kStochastic ? read_seed(work.scalars) : 0;
      at::parallel_for(0, total, cpu::kGrain / kBlock, [&](int64_t begin, int64_t end) {
        cpu::Rebound<Op> rebound(op);
        cpu::for_each_piece(offset, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
          const Op& bound = rebound.for_tensor(work, i);
          const uint32_t key = L::kStochastic ? rounding::tensor_key(seed, work.ordinal[i]) : 0u;
          void* const* ptr = work.ptr[i].data();
          const int64_t row = work.row[i], per_row = num_blocks(row);
          for (int64_t b = lo; b < hi; ++b) {
            const int64_t k = b % per_row;  // the block's position in its row
            fn(ptr, b, (b / per_row) * row + k * kBlock, std::min<int64_t>(kBlock, row - k * kBlock), bound, key,
               sgn);
          }
        });
      });
    }
  }
};

}  // namespace quant
}  // namespace fusedtrain
