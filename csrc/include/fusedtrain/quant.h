// 8-bit blockwise-quantized optimizer states: the code maps and the (de)quantization of one value, for
// the host and the device. The one definition of the format; the CPU (quant_cpu.h) and CUDA
// (quant_cuda.cuh) drivers and Python (fusedtrain._C.quant_maps(), optim/_quant.py) all read it from here.
//
// Note [8-bit optimizer states]:
// A state tensor (Adam's exp_avg, exp_avg_sq, ...) of n elements is stored as n one-byte codes of the
// parameter's shape plus one float32 scale per block of up to kBlock = 256 consecutive elements, the
// block's absolute maximum ("absmax", as in bitsandbytes' blockwise 8-bit optimizers, Dettmers et al.
// 2022). Element i of block b holds
//     value = map[code_i] * absmax_b          (float32 arithmetic)
// (The optimizers store their non-negative second moments through their square root: unsigned codes there
// hold sqrt(state), and the state reads as value^2; Note [square-root states] in rules_quant.h.)
// Note [row blocks]: blocks never cross a dim-0 slice ("row") of the parameter. A parameter of >= 2 dims
// is viewed as [rows = size(0), row = numel / rows] in row-major element order (whatever its strides);
// each row is cut into ceil(row / 256) blocks from its start, the last one shorter when 256 does not
// divide row, and absmax has shape [rows, ceil(row / 256)]. A parameter of 0 or 1 dims is one row
// (absmax of shape [ceil(n / 256)]). Block b (the flat index into absmax) of a tensor covers elements
// (b / bpr) * row + (b % bpr) * 256 .. + min(256, row - (b % bpr) * 256), bpr = ceil(row / 256).
// Why rows: FSDP2 and tensor parallelism shard a parameter along dim 0 (Shard(0)) at row boundaries, so
// codes and absmax shard exactly like the parameter (Shard(0) of both), a block never straddles two
// ranks, and torch.distributed.checkpoint reshards both as ordinary tensors. When 256 divides row this is
// the flat layout (blocks of 256 consecutive elements of the whole tensor) with absmax reshaped.
// A block may be shorter than 256 (a "tail"); its scale covers only its own elements. An update
// dequantizes a whole block into registers, runs the rule's per-element functor of math.h unchanged,
// takes the block's new absmax, and requantizes each value x to the code of the nearest map entry of
// x / absmax (x * (1/absmax) in the opmath type): one read and one write of codes and scales per step.
// A block that is all zeros has absmax 0 and codes 0. A non-finite state makes its block's absmax
// non-finite (the NaN/inf of a diverged run stays visible, as in a float state).
//
// Two maps, both strictly increasing, with 0 and 1 (and -1) exactly representable, dense near 0 in
// relative terms (a "dynamic" map: a decimal exponent and a linear fraction, the construction of
// bitsandbytes' create_dynamic_map, with left endpoints instead of midpoints so that 1 is a code):
//  - unsigned (uint8 codes, non-negative states such as exp_avg_sq): code 0 -> 0, code 255 -> 1, and for
//    e = 0..6, j = 0..2^(e+1)-1:   code 2^(e+1) - 1 + j  ->  10^(e-6) * (0.1 + 0.9 * j / 2^(e+1))
//    (smallest non-zero 1e-7, largest below 1: 0.99297);
//  - signed (int8 codes, signed states such as exp_avg): code 0 -> 0, codes +-127 -> +-1, and for
//    e = 1..6, j = 0..2^e-1:   codes +-(2^e - 1 + j)  ->  +-10^(e-6) * (0.1 + 0.9 * j / 2^e)
//    (smallest non-zero magnitude 1e-6; code -128 decodes to -1 and is never written).
// Each value is computed in double and rounded to float32. The nearest code is found by comparing with
// the midpoints of neighbouring entries (float32, computed in double and rounded): the code is the number
// of midpoints strictly below the magnitude, so a value exactly on a midpoint takes the code nearer zero.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fusedtrain/math.h"

namespace fusedtrain {
namespace quant {

constexpr int kBlock = 256;  // elements per scale

FT_HD int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Blocks of a tensor of numel elements in rows of `row` elements (Note [row blocks]): rows * ceil(row / 256).
FT_HD int64_t tensor_blocks(int64_t numel, int64_t row) { return row > 0 ? numel / row * num_blocks(row) : 0; }

// What a rule's state list holds (rules declare state_kinds(hyper) next to states(hyper); optim_host.h
// checks the lists by it).
// The 4-bit lists (Note [4-bit optimizer states] in quant4.h): packed codes (int8 bytes for the signed map,
// uint8 for the unsigned one) and one scale per block of quant4.h's kBlock4 elements.
// kFloatState: a state a quantized rule keeps float (Note [mixed state lists] in rules_quant.h), of the
// parameter's dtype and shape (float32 masters' dtype beside master weights).
enum Kind : int {
  kSignedCodes = 1,
  kUnsignedCodes = 2,
  kScales = 3,
  kSignedNibbles = 4,
  kUnsignedNibbles = 5,
  kScales4 = 6,
  kFloatState = 7
};

// Note [block passes that read or reduce]:
// A block op may declare kStore (bit 0: the parameter, bit 2 + s: state s), as the trust-ratio passes of
// rules_trust.h do: the walk then stores the parameter (and its copy) only where bit 0 is set, and requantizes
// only the states whose bit is set. A pass that only reads a state leaves its codes and absmax exactly as they
// were (decoding and encoding again is not always the identity: a square-root state's root * root can
// underflow). The functors of math.h declare no kStore and store everything.
// A block op may also declare kSums > 0 and a member terms(r, t) (up to two double terms per element, as the
// trust passes' op(r, t)): after a block is stored, the walk decodes the block's states again from their new
// codes and calls terms on (param, grad, states) as stored, so the terms see exactly what a later pass will
// read (rules_trust_quant.h: LAMB's update norm from the requantized moments). A block's terms are added in a
// fixed order (CPU: a vectorized sum of the block's terms; CUDA: a fixed tree over the block's threads), and each
// tensor's sums add its blocks' sums in block order: the same result for any number of threads (quant_cpu.h's
// run_blocks returns them; quant_cuda.cuh writes them for trust_cuda.cuh's finisher). 8-bit row blocks only.
template <class Op, class = void>
struct StoreMask : std::integral_constant<unsigned, ~0u> {};
template <class Op>
struct StoreMask<Op, std::void_t<decltype(Op::kStore)>> : std::integral_constant<unsigned, Op::kStore> {};
template <class Op, class = void>
struct BlockSums : std::integral_constant<int, 0> {};
template <class Op>
struct BlockSums<Op, std::void_t<decltype(Op::kSums)>> : std::integral_constant<int, Op::kSums> {};

// The tables of both maps (Note [8-bit optimizer states]). Thresholds: mid[k] between entries k and k+1;
// the unused last slot is +inf-like (never read by the searches below).
struct Maps {
  float unsigned_value[256];
  float unsigned_mid[256];
  float signed_value[128];  // magnitudes of codes 0..127
  float signed_mid[128];
};

constexpr double pow10_from_minus6(int e) {
  double p = 1.0;
  for (int k = e; k < 6; ++k) p /= 10.0;
  return p;
}

constexpr double unsigned_entry(int c) {
  if (c == 0) return 0.0;
  if (c == 255) return 1.0;
  int e = 0;
  while (c > (1 << (e + 2)) - 2) ++e;  // decade e holds codes 2^(e+1)-1 .. 2^(e+2)-2
  const int j = c - ((1 << (e + 1)) - 1);
  return pow10_from_minus6(e) * (0.1 + 0.9 * j / static_cast<double>(1 << (e + 1)));
}

constexpr double signed_entry(int c) {  // magnitude of code c in 0..127
  if (c == 0) return 0.0;
  if (c == 127) return 1.0;
  int e = 1;
  while (c > (1 << (e + 1)) - 2) ++e;  // decade e holds codes 2^e-1 .. 2^(e+1)-2
  const int j = c - ((1 << e) - 1);
  return pow10_from_minus6(e) * (0.1 + 0.9 * j / static_cast<double>(1 << e));
}

constexpr Maps make_maps() {
  Maps m{};
  for (int c = 0; c < 256; ++c) m.unsigned_value[c] = static_cast<float>(unsigned_entry(c));
  for (int c = 0; c < 255; ++c) {
    m.unsigned_mid[c] = static_cast<float>((static_cast<double>(m.unsigned_value[c]) + m.unsigned_value[c + 1]) / 2);
  }
  m.unsigned_mid[255] = 3.0e38f;
  for (int c = 0; c < 128; ++c) m.signed_value[c] = static_cast<float>(signed_entry(c));
  for (int c = 0; c < 127; ++c) {
    m.signed_mid[c] = static_cast<float>((static_cast<double>(m.signed_value[c]) + m.signed_value[c + 1]) / 2);
  }
  m.signed_mid[127] = 3.0e38f;
  return m;
}

// The host's copy (the CUDA kernels copy it into shared memory from their own __constant__ copy).
inline constexpr Maps kMaps = make_maps();

// Nearest code of x (already divided by the block's absmax; x may exceed 1 by rounding). Branch-free
// binary searches over the midpoints: CUDA threads do not diverge (the CPU driver computes the same codes
// without tables and asks these only for values near a midpoint, Note [lattice encoder] in quant_cpu.h). A NaN
// gets code 0.
#if defined(__CUDACC__)
#define FT_QUANT_UNROLL _Pragma("unroll")
#else
#define FT_QUANT_UNROLL _Pragma("GCC unroll 8")
#endif
template <typename T>
FT_HD uint8_t encode_unsigned(T x, const float* mid) {
  int c = 0;
  FT_QUANT_UNROLL
  for (int step = 128; step >= 1; step >>= 1) c += (static_cast<T>(mid[c + step - 1]) < x) ? step : 0;
  return static_cast<uint8_t>(c);
}

template <typename T>
FT_HD int8_t encode_signed(T x, const float* mid) {
  const T a = x < T(0) ? -x : x;
  int c = 0;
  FT_QUANT_UNROLL
  for (int step = 64; step >= 1; step >>= 1) c += (static_cast<T>(mid[c + step - 1]) < a) ? step : 0;
  return static_cast<int8_t>(x < T(0) ? -c : c);
}

// value = map[code] * absmax, in float32 (Note [8-bit optimizer states]).
FT_HD float decode_unsigned(uint8_t code, float absmax, const float* value) { return value[code] * absmax; }

FT_HD float decode_signed(int8_t code, float absmax, const float* value) {
  const int c = code;
  const float v = value[c < 0 ? (c == -128 ? 127 : -c) : c] * absmax;
  return c < 0 ? -v : v;
}

}  // namespace quant
}  // namespace fusedtrain
