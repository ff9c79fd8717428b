// The CPU block driver of the quantized rules (Note [quantized rules] in rules_quant.h).
//
// Note [CPU block split]:
// As Note [CPU work split] (cpu_driver.h), with blocks (of up to quant::kBlock elements of one row, Note
// [row blocks] in quant.h) in place of elements:
// the blocks of all tensors of a call are laid end to end, one at::parallel_for region splits them into
// equal ranges, and a block is never split (its absmax depends on all its elements). Per block, four
// loops over at most 256 elements, each compiled for the ISA picked at run time like loop_body:
// dequantize the states into a stack buffer (opmath type), run the rule's functor on (param, grad,
// states) and store the parameter, take each state's absmax, requantize (Note [lattice encoder]); every
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

#ifdef FT_HAVE_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fusedtrain {
namespace quant {
namespace cpu_impl {

// Note [lattice encoder]:
// The binary search of quant.h costs 8 (unsigned) or 7 (signed) dependent table gathers per value, and even one
// gather per value makes the CPU step compute-bound (GCC emulates a vector gather with 8 extracts, loads and
// inserts; Zen 3's native gathers are slower still). Both maps are one lattice: decade e (values
// 10^(e-6) * (0.1 + 0.9 j / F_e), F_e = 2^(e+1) unsigned, 2^e signed) starts at code F_e - 1, consecutive
// decades have consecutive codes, and the midpoint between the last entry of a decade and the first of the next
// sits at j = F_e - 1/2 of the lower decade's lattice. So with the decade picked by comparisons with 10^-6 ..
// 10^-1 (selects, no table), t = (x 10^(6-e) - 0.1) F_e / 0.9 + 1/2 puts the midpoint below code F_e - 1 + n at
// t ~ n, and the code is F_e - 1 + floor(t): no table at all. t is computed in T with rounding, and the table's
// midpoints are rounded too, so a value within a hair of a midpoint may land on the wrong side: where the
// fraction of t is within kLatticeEps of an integer the block's encode loop marks the value and a scalar pass
// recomputes it with quant.h's search (the one definition; about 1 value in 2000). Why the rest is exact: each
// float operation is monotone, so t is a non-decreasing function of x within a decade; lattice_margin_ok()
// (static_assert below) evaluates t at every midpoint of both maps, for float and double, and checks that it
// lies within kLatticeEps / 4 of the integer it should; so t(x) >= n + kLatticeEps means x is above the midpoint
// below code F_e - 1 + n, and t(x) <= n + 1 - kLatticeEps that it is below the next one. Code 0 (below mid[0],
// outside the lattice) is one exact comparison with mid[0]. A NaN (t clamped to 0, fraction 0) is marked and
// goes to the search, which gives it code 0. The build rounds every operation as written
// (-ffp-contract=off), so the vector loop computes the same t as the compile-time check.
constexpr double kLatticeEps = 1.0 / 4096;

// The decades of a map by k, the number of decade starts (10^-6 unsigned only, 10^-5, ..., 10^-1) at or below
// x: the scale 10^(6-e), t's slope F_e / 0.9 and the first code F_e - 1.
template <typename T, bool kSigned>
struct Lattice {
  static constexpr int kTop = kSigned ? 127 : 255;
  static constexpr int kStarts = kSigned ? 5 : 6;
  static constexpr T kStart[6] = {T(kSigned ? 1e-5 : 1e-6), T(kSigned ? 1e-4 : 1e-5), T(kSigned ? 1e-3 : 1e-4),
                                  T(kSigned ? 1e-2 : 1e-3), T(kSigned ? 1e-1 : 1e-2), T(1e-1)};
  static constexpr T kScale[8] = {T(kSigned ? 1e5 : 1e6), T(kSigned ? 1e4 : 1e5), T(kSigned ? 1e3 : 1e4),
                                  T(kSigned ? 1e2 : 1e3), T(kSigned ? 1e1 : 1e2), T(kSigned ? 1 : 1e1), T(1), T(1)};
  static constexpr T slope(int k) { return static_cast<T>(2 << k) * T(1.0 / 0.9); }
  static constexpr T kSlope[8] = {slope(0), slope(1), slope(2), slope(3), slope(4), slope(5), slope(6), slope(6)};
  static constexpr int kFirst[8] = {1, 3, 7, 15, 31, 63, 127, 127};
  static constexpr T kMid0 = static_cast<T>(kSigned ? kMaps.signed_mid[0] : kMaps.unsigned_mid[0]);
};

template <bool kSigned>
using CodeOf = std::conditional_t<kSigned, int8_t, uint8_t>;  // the byte type of a map's codes

// Note [lattice encoder]: the code estimate of x >= 0 and the fraction of t (the specification the vector
// version below computes operation for operation).
template <typename T, bool kSigned>
constexpr inline __attribute__((always_inline)) int lattice_code(T x, T& frac) {
  using Lat = Lattice<T, kSigned>;
  T scale = Lat::kScale[0], slope = Lat::kSlope[0];
  int first = Lat::kFirst[0];
  for (int k = 0; k < Lat::kStarts; ++k) {  // selects, not table loads: the loop vectorizes
    const bool up = x >= Lat::kStart[k];
    scale = up ? Lat::kScale[k + 1] : scale;
    slope = up ? Lat::kSlope[k + 1] : slope;
    first = up ? Lat::kFirst[k + 1] : first;
  }
  T t = (x * scale - T(0.1)) * slope + T(0.5);
  t = t > T(0) ? t : T(0);  // also NaN
  t = t < T(300) ? t : T(300);
  const int n = static_cast<int>(t);  // floor: t >= 0
  frac = t - static_cast<T>(n);
  int c = first + n;
  c = c < Lat::kTop ? c : Lat::kTop;
  return x > Lat::kMid0 ? c : 0;
}

template <typename T>
constexpr inline __attribute__((always_inline)) bool near_integer(T frac) {
  return frac < T(kLatticeEps) || frac > T(1.0 - kLatticeEps);
}

// Note [lattice encoder]: at midpoint k (between codes k and k + 1) t must be within kLatticeEps / 4 of an
// integer, from above with the estimate k + 1 or from below with the estimate k.
template <typename T, bool kSigned>
constexpr bool lattice_margin_ok() {
  constexpr int kTop = kSigned ? 127 : 255;
  const T d = T(kLatticeEps / 4);
  for (int k = 1; k < kTop; ++k) {
    const T m = static_cast<T>(kSigned ? kMaps.signed_mid[k] : kMaps.unsigned_mid[k]);
    T frac = 0;
    const int c = lattice_code<T, kSigned>(m, frac);
    if (!((frac <= d && c == k + 1) || (frac >= T(1) - d && c == k))) return false;
  }
  return true;
}
static_assert(lattice_margin_ok<float, false>() && lattice_margin_ok<float, true>() &&
                  lattice_margin_ok<double, false>() && lattice_margin_ok<double, true>(),
              "Note [lattice encoder]: a midpoint lies too far from its lattice point; raise kLatticeEps");

#ifdef FT_HAVE_X86_DISPATCH
// Note [lattice encoder]: lattice_code<float> on 8 values at a time (AVX2). GCC vectorizes the scalar loop
// with three blends per decade start and clamps folded into integer blends, ~75 instructions per 8 values;
// here k is a compare-and-subtract per decade start, the decade's constants are in-register permutes
// (vpermps / vpermd of the Lattice tables), and t is the same four operations in the same order, ~35
// instructions. The clamps of the scalar version are no-ops for x >= 0 (t > 1/4), and a NaN ends at code 0
// either way: its t is clamped to 300 (marked, so the search gives it 0) and x > mid[0] is false.
// Returns how many values it did (a multiple of 8); the caller finishes the rest with lattice_code.
template <bool kSigned>
__attribute__((target("avx2,fma"))) inline int64_t encode_avx2(const float* __restrict__ x, float inv, int64_t n,
                                                             CodeOf<kSigned>* __restrict__ code,
                                                             int32_t* __restrict__ mark, int32_t& near) {
  using Lat = Lattice<float, kSigned>;
  const __m256 vinv = _mm256_set1_ps(inv), scales = _mm256_loadu_ps(Lat::kScale),
               slopes = _mm256_loadu_ps(Lat::kSlope), tenth = _mm256_set1_ps(0.1f), half = _mm256_set1_ps(0.5f),
               cap = _mm256_set1_ps(300.0f), mid0 = _mm256_set1_ps(Lat::kMid0),
               lo = _mm256_set1_ps(static_cast<float>(kLatticeEps)),
               hi = _mm256_set1_ps(static_cast<float>(1.0 - kLatticeEps)),
               magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i firsts = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Lat::kFirst)),
                top = _mm256_set1_epi32(Lat::kTop);
  __m256i any = _mm256_setzero_si256();
  const int64_t n8 = n & ~int64_t(7);
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    const __m256 a = kSigned ? _mm256_and_ps(v, magnitude) : v;
    __m256i k = _mm256_setzero_si256();
    for (int d = 0; d < Lat::kStarts; ++d) {
      const __m256 up = _mm256_cmp_ps(a, _mm256_set1_ps(Lat::kStart[d]), _CMP_GE_OQ);
      k = _mm256_sub_epi32(k, _mm256_castps_si256(up));
    }
    const __m256 scale = _mm256_permutevar8x32_ps(scales, k), slope = _mm256_permutevar8x32_ps(slopes, k);
    __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(a, scale), tenth), slope), half);
    t = _mm256_min_ps(t, cap);
    const __m256i whole = _mm256_cvttps_epi32(t);
    const __m256 frac = _mm256_sub_ps(t, _mm256_cvtepi32_ps(whole));
    __m256i c = _mm256_min_epi32(_mm256_add_epi32(_mm256_permutevar8x32_epi32(firsts, k), whole), top);
    c = _mm256_and_si256(c, _mm256_castps_si256(_mm256_cmp_ps(a, mid0, _CMP_GT_OQ)));
    if constexpr (kSigned) c = _mm256_sign_epi32(c, _mm256_castps_si256(v));
    const __m256i m = _mm256_castps_si256(
        _mm256_or_ps(_mm256_cmp_ps(frac, lo, _CMP_LT_OQ), _mm256_cmp_ps(frac, hi, _CMP_GT_OQ)));
    // 8 int32 codes (-127..255) to 8 bytes: saturating packs leave them unchanged
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(code + i),
                     kSigned ? _mm_packs_epi16(words, words) : _mm_packus_epi16(words, words));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mark + i), m);
    any = _mm256_or_si256(any, m);
  }
  near |= _mm256_testz_si256(any, any) ? 0 : 1;
  return n8;
}
#endif

// Note [lattice encoder]: the codes of x[0..n) * inv into code[], exactly quant.h's encode_signed /
// encode_unsigned: the lattice for all, then the search for the values it marked near a midpoint.
template <typename T, bool kSigned, bool kVector>
inline __attribute__((always_inline)) void encode_block(const T* __restrict__ x, T inv, int64_t n,
                                                        CodeOf<kSigned>* __restrict__ code) {
  int32_t mark[kBlock];
  int32_t near = 0;
  int64_t i = 0;
#ifdef FT_HAVE_X86_DISPATCH
  if constexpr (kVector && std::is_same_v<T, float>) i = encode_avx2<kSigned>(x, inv, n, code, mark, near);
#endif
  for (; i < n; ++i) {
    const T v = x[i] * inv;
    T frac = 0;
    const int a = lattice_code<T, kSigned>(v < T(0) ? -v : v, frac);
    code[i] = static_cast<CodeOf<kSigned>>(v < T(0) ? -a : a);
    const int32_t m = near_integer(frac) ? 1 : 0;
    mark[i] = m;
    near |= m;
  }
  if (near) {
    for (int64_t j = 0; j < n; ++j) {
      if (!mark[j]) continue;
      if constexpr (kSigned) {
        code[j] = encode_signed(x[j] * inv, kMaps.signed_mid);
      } else {
        code[j] = encode_unsigned(x[j] * inv, kMaps.unsigned_mid);
      }
    }
  }
}

// Note [vectorized block loops]:
// Every loop of RowBlocks::body (with update_block and state_absmax) compiles to AVX2 / AVX-512 vector code
// (check with -fopt-info-vec-optimized on optim_adam8bit.cpp; a scalar loop here made the step ~30x slower than
// the float32 step):
//  - decoding reads one 256-entry float table per map indexed by the code's byte (kSignedByByte holds the
//    signed map at byte (uint8_t)code, so both maps gather through a zero-extended 32-bit index; the same
//    values as quant.h's decode_signed: negation is exact);
//  - the block's absmax is an integer max of the float bit patterns with the sign bit cleared: for
//    non-negative floats the bit order is the value order, and every NaN pattern lies above +inf, so a NaN
//    anywhere in the block wins the max (Note [8-bit optimizer states]: a diverged block stays visible)
//    without a separate flag;
//  - encoding writes the byte codes directly and near-midpoint marks into a local buffer (Note [lattice
//    encoder]).
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

// Note [quantized block formats]:
// The 8-bit (row blocks of kBlock, one byte per code: here) and 4-bit (flat blocks of kBlock4, packed codes:
// quant4_cpu.h) CPU drivers share everything but a block's decode and encode: the rule's functor over the
// block (update_block), the block's new scale (state_absmax), the per-ISA block functions and the parallel walk
// over the blocks of all tensors (run_blocks). A format F declares
//   static constexpr int kBlock;                                   elements per block at most
//   static int64_t blocks(int64_t numel, int64_t row);             blocks of a tensor
//   static void locate(int64_t b, int64_t numel, int64_t row, int64_t* e0, int64_t* n);   block b's elements
//   template <class L, typename Op, bool kVector> static void body(void* const* ptr, int64_t b, int64_t e0,
//       int64_t n, const Op& op, uint32_t key, const Forms& fm);  one block (kVector: AVX2 or above)
// and, for the passes that reduce (Note [block passes that read or reduce] in quant.h; RowBlocks only),
//   template <class L, typename Op, bool kVector> static void terms(void* const* ptr, int64_t b, int64_t e0,
//       int64_t n, const Op& op, const Forms& fm, double* sums);   the block's two sums of op.terms

// The rule's functor over the n dequantized elements of one block (st: per state, in place), storing the
// parameter (and its copy, list copy_list: Note [mixed state lists] in rules_quant.h) at elements e0.. of the
// tuple's lists (Note [block passes that read or reduce]: unless the op stores no parameter, quant.h).
template <class L, typename Op, typename T, size_t R, size_t N>
inline __attribute__((always_inline)) void update_block(void* const* ptr, int64_t e0, int64_t n, const Op& op,
                                                        uint32_t key, T (&st)[R][N], int copy_list) {
  constexpr int D = Op::depth, S = D - 2;
  typename L::P* __restrict__ p = static_cast<typename L::P*>(ptr[0]) + e0;
  const typename L::G* __restrict__ g = static_cast<const typename L::G*>(ptr[1]) + e0;
  typename L::O* __restrict__ out = L::kCopy ? static_cast<typename L::O*>(ptr[copy_list]) + e0 : nullptr;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    T r[D];
    r[0] = static_cast<T>(p[i]);
    r[1] = static_cast<T>(g[i]);
    for (int s = 0; s < S; ++s) r[2 + s] = st[s][i];
    op(r);
    if constexpr ((StoreMask<Op>::value & 1u) != 0) {  // Note [block passes that read or reduce] (quant.h)
      p[i] = rounding::store_param<L>(r[0], key, e0 + i);
      if constexpr (L::kCopy) out[i] = static_cast<typename L::O>(r[0]);
    }
    for (int s = 0; s < S; ++s) st[s][i] = r[2 + s];
  }
}

// A state's new block scale: the square roots first for an unsigned state (Note [square-root states] in
// rules_quant.h: its codes hold sqrt(state)), then the largest magnitude as bits (Note [vectorized block
// loops]: a NaN wins).
template <typename T>
inline __attribute__((always_inline)) float state_absmax(T* __restrict__ x, int64_t n, bool is_signed) {
  using Bits = BitsOf<T>;
  if (!is_signed) {
    for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
  }
  Bits top = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Bits bits = __builtin_bit_cast(Bits, x[i]) & std::numeric_limits<Bits>::max();
    top = bits > top ? bits : top;
  }
  return static_cast<float>(__builtin_bit_cast(T, top));
}

// 8-bit codes in row blocks (Note [row blocks] in quant.h): block b (its absmax index) of its tensor is the n
// (<= kBlock) elements from e0. ptr: the tuple's lists (param, grad, per state (codes, absmax) or a float
// state's values, copy: Note [mixed state lists] in rules_quant.h).
struct RowBlocks {
  static constexpr int kBlock = quant::kBlock;
  static int64_t blocks(int64_t numel, int64_t row) { return tensor_blocks(numel, row); }
  static void locate(int64_t b, int64_t, int64_t row, int64_t* e0, int64_t* n) {
    const int64_t per_row = num_blocks(row), k = b % per_row;  // the block's position in its row
    *e0 = (b / per_row) * row + k * kBlock;
    *n = std::min<int64_t>(kBlock, row - k * kBlock);
  }

  // Block b's states, dequantized (a float state: copied) into st (opmath type).
  template <class L, int S, typename T>
  static inline __attribute__((always_inline)) void decode(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                           const Forms& fm, T (&st)[S > 0 ? S : 1][kBlock]) {
    for (int s = 0; s < S; ++s) {
      const int l = fm.list(s);
      T* __restrict__ x = st[s];
      if (fm.is_float(s)) {  // Note [mixed state lists] (rules_quant.h)
        const typename L::St* __restrict__ v = static_cast<const typename L::St*>(ptr[l]) + e0;
        for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(v[i]);
        continue;
      }
      const float absmax = static_cast<const float*>(ptr[l + 1])[b];
      const uint8_t* __restrict__ c = static_cast<const uint8_t*>(ptr[l]) + e0;
      if (fm.is_signed(s)) {
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
  }

  template <class L, typename Op, bool kVector>
  static inline __attribute__((always_inline)) void body(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                         const Op& op_in, uint32_t key, const Forms& fm) {
    using T = at::opmath_type<typename L::P>;
    constexpr int S = Op::depth - 2;
    const Op op = op_in;
    T st[S > 0 ? S : 1][kBlock];
    decode<L, S>(ptr, b, e0, n, fm, st);
    update_block<L>(ptr, e0, n, op, key, st, fm.list(S));
    for (int s = 0; s < S; ++s) {
      // Note [block passes that read or reduce] (quant.h): a state the op only reads keeps its codes
      if (((StoreMask<Op>::value >> (2 + s)) & 1u) == 0) continue;
      const int l = fm.list(s);
      T* __restrict__ x = st[s];
      if (fm.is_float(s)) {  // Note [mixed state lists] (rules_quant.h): stored as the float drivers store it
        typename L::St* __restrict__ v = static_cast<typename L::St*>(ptr[l]) + e0;
        for (int64_t i = 0; i < n; ++i) v[i] = static_cast<typename L::St>(x[i]);
        continue;
      }
      const float absmax = state_absmax(x, n, fm.is_signed(s));
      static_cast<float*>(ptr[l + 1])[b] = absmax;
      const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
      if (fm.is_signed(s)) {
        encode_block<T, true, kVector>(x, inv, n, static_cast<int8_t*>(ptr[l]) + e0);
      } else {
        encode_block<T, false, kVector>(x, inv, n, static_cast<uint8_t*>(ptr[l]) + e0);
      }
    }
  }

  // Note [block passes that read or reduce] (quant.h): the op's terms over block b as stored, in a fixed order.
  template <class L, typename Op, bool kVector>
  static inline __attribute__((always_inline)) void terms(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                          const Op& op_in, const Forms& fm, double* sums) {
    using T = at::opmath_type<typename L::P>;
    constexpr int D = Op::depth, S = D - 2;
    const Op op = op_in;
    T st[S > 0 ? S : 1][kBlock];
    decode<L, S>(ptr, b, e0, n, fm, st);
    const typename L::P* __restrict__ p = static_cast<const typename L::P*>(ptr[0]) + e0;
    const typename L::G* __restrict__ g = static_cast<const typename L::G*>(ptr[1]) + e0;
    double t0[kBlock], t1[kBlock];
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      T r[D];
      r[0] = static_cast<T>(p[i]);
      r[1] = static_cast<T>(g[i]);
      for (int s = 0; s < S; ++s) r[2 + s] = st[s][i];
      double t[2] = {0.0, 0.0};
      op.terms(r, t);
      t0[i] = t[0];
      t1[i] = t[1];
    }
    double a0 = 0.0, a1 = 0.0;  // (as trust_cpu.h's body: a separate reduction loop vectorizes)
#pragma omp simd reduction(+ : a0, a1)
    for (int64_t i = 0; i < n; ++i) {
      a0 += t0[i];
      a1 += t1[i];
    }
    sums[0] = a0;
    sums[1] = a1;
  }
};

template <class L, typename Op>
using BlockFn = void (*)(void* const*, int64_t, int64_t, int64_t, const Op&, uint32_t, const Forms&, double*);

// One block of format F: its update, then (Note [block passes that read or reduce] in quant.h) its terms.
template <class F, class L, typename Op, bool kVector>
inline __attribute__((always_inline)) void block(void* const* ptr, int64_t b, int64_t e0, int64_t n, const Op& op,
                                                 uint32_t key, const Forms& fm, double* sums) {
  F::template body<L, Op, kVector>(ptr, b, e0, n, op, key, fm);
  if constexpr (BlockSums<Op>::value > 0) F::template terms<L, Op, kVector>(ptr, b, e0, n, op, fm, sums);
}

#ifdef FT_HAVE_X86_DISPATCH
template <class F, class L, typename Op>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void block_avx512(
    void* const* ptr, int64_t b, int64_t e0, int64_t n, const Op& op, uint32_t key, const Forms& fm, double* sums) {
  block<F, L, Op, true>(ptr, b, e0, n, op, key, fm, sums);
}
template <class F, class L, typename Op>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(void* const* ptr, int64_t b, int64_t e0, int64_t n,
                                                          const Op& op, uint32_t key, const Forms& fm,
                                                          double* sums) {
  block<F, L, Op, true>(ptr, b, e0, n, op, key, fm, sums);
}
#endif
template <class F, class L, typename Op>
void block_baseline(void* const* ptr, int64_t b, int64_t e0, int64_t n, const Op& op, uint32_t key,
                    const Forms& fm, double* sums) {
  block<F, L, Op, false>(ptr, b, e0, n, op, key, fm, sums);
}

template <class F, class L, typename Op>
BlockFn<L, Op> select_block() {
#ifdef FT_HAVE_X86_DISPATCH
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return &block_avx512<F, L, Op>;
    case cpu::Isa::kAvx2:
      return &block_avx2<F, L, Op>;
    default:
      break;
  }
#endif
  return &block_baseline<F, L, Op>;
}

// Note [CPU block split] over format F's blocks (Note [quantized block formats]). Bound per tensor as
// multi_tensor_apply binds (Note [per-tensor binding]). Returns each tensor's two sums of the op's terms
// (Note [block passes that read or reduce] in quant.h: the blocks' sums in block order; zeros without terms).
template <class F, class L, typename Op>
std::vector<double> run_blocks(const Work& work, const Op& op, const Forms& fm) {
  constexpr int S = Op::depth - 2;
  constexpr bool kReduces = BlockSums<Op>::value > 0;
  std::vector<double> sums(2 * work.size(), 0.0);
  if constexpr (2 + 2 * S + (L::kCopy ? 1 : 0) > kMaxDepth || S > kMaxStates) {
    TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
  } else {
    std::vector<int64_t> offset(work.size() + 1, 0);  // in blocks
    for (size_t i = 0; i < work.size(); ++i) offset[i + 1] = offset[i] + F::blocks(work.numel[i], work.row[i]);
    const int64_t total = offset.back();
    if (total == 0) return sums;
    std::vector<double> partial(kReduces ? 2 * total : 0, 0.0);  // per block, in block order
    const BlockFn<L, Op> fn = select_block<F, L, Op>();
    const uint64_t seed = L::kStochastic ? read_seed(work.scalars) : 0;
    at::parallel_for(0, total, cpu::kGrain / F::kBlock, [&](int64_t begin, int64_t end) {
      cpu::Rebound<Op> rebound(op);
      cpu::for_each_piece(offset, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
        const Op& bound = rebound.for_tensor(work, i);
        const uint32_t key = L::kStochastic ? rounding::tensor_key(seed, work.ordinal[i]) : 0u;
        void* const* ptr = work.ptr[i].data();
        for (int64_t b = lo; b < hi; ++b) {
          int64_t e0 = 0, n = 0;
          F::locate(b, work.numel[i], work.row[i], &e0, &n);
          fn(ptr, b, e0, n, bound, key, fm, kReduces ? &partial[2 * (offset[i] + b)] : nullptr);
        }
      });
    });
    if constexpr (kReduces) {
      for (size_t i = 0; i < work.size(); ++i) {
        for (int64_t b = offset[i]; b < offset[i + 1]; ++b) {
          sums[2 * i] += partial[2 * b];
          sums[2 * i + 1] += partial[2 * b + 1];
        }
      }
    }
  }
  return sums;
}

}  // namespace cpu_impl

template <>
struct Driver<cpu::Backend> {
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Forms& fm) {
    cpu_impl::run_blocks<cpu_impl::RowBlocks, L>(work, op, fm);
  }
};

}  // namespace quant
}  // namespace fusedtrain
