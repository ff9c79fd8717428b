// CPU driver of the dropout family: dropout (any group size: Dropout, Dropout2d, DropPath), its
// in-place form, bias-dropout-add forward and backward.
//
// Note [CPU dropout loop]:
// The flat index space is cut into chunks of kChunk elements, and at::parallel_for hands whole chunks to
// the threads. For each chunk the driver first writes the multipliers (0 or scale, Note [dropout keep
// rule]) of its decision indices into an L1-resident buffer, computing kLanes Philox blocks side by side
// as plain integer arithmetic on arrays (the auto-vectorizer maps one block to one SIMD lane: 32 blocks =
// 128 elements per pass), then runs the elementwise loop over the chunk. Both loops are compiled
// for AVX-512, AVX2+FMA and the baseline ISA (Note [CPU SIMD dispatch] in cpu_driver.h) and the copy is
// picked at run time. The result does not depend on the thread count or the ISA: every element's
// multiplier is a function of its index alone.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "fusedtrain/cpu_isa_run.h"
#include "fusedtrain/dropout.h"
#include "fusedtrain/dropout_host.h"
#include "fusedtrain/philox.h"

namespace fusedtrain {
namespace cpu {
namespace {

#define FT_AI inline __attribute__((always_inline))

constexpr int kLanes = 32;          // Philox blocks per vectorized pass (32: 23 % faster than 16, NOTES.md)
constexpr int64_t kChunk = 2048;    // elements (or groups) per multiplier buffer; a multiple of 4 * kLanes
constexpr int64_t kGrainChunks = 8; // chunks per parallel_for grain (16 K elements)
constexpr int64_t kReduceBlock = 1 << 16;  // elements per fixed partial sum of the bias gradient

// out[k] = rule.multiplier(word(first + k)) for k < count.
template <typename T>
FT_AI void gen_multipliers(const philox::Stream& stream, const dropout::KeepRule<T>& keep, uint64_t first,
                           int64_t count, T* out) {
  // Local copies: `out` could alias the caller's rule (it holds a T), and reloading it per element
  // keeps GCC from if-converting the select, leaving a branch on random bits (10x slower).
  const philox::Stream s = stream;
  const dropout::KeepRule<T> rule = keep;
  int64_t k = 0;
  for (; k < count && ((first + k) & 3) != 0; ++k) out[k] = rule.multiplier(s.word(first + k));
  uint64_t blk = (first + k) >> 2;
  for (; k + 4 * kLanes <= count; k += 4 * kLanes, blk += kLanes) {
    // One Philox block per lane, in the 64-bit form of philox4x32_10 (see philox.h).
    uint64_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t n = blk + static_cast<uint64_t>(l);
      uint64_t c0 = n & 0xFFFFFFFFu, c1 = n >> 32, c2 = s.o0, c3 = s.o1;
      philox::philox4x32_10(c0, c1, c2, c3, s.k0, s.k1);
      w0[l] = c0;
      w1[l] = c1;
      w2[l] = c2;
      w3[l] = c3;
    }
    uint32_t u[4 * kLanes];  // words in index order: block l gives indices 4l .. 4l+3
    for (int l = 0; l < kLanes; ++l) {
      u[4 * l + 0] = static_cast<uint32_t>(w0[l]);
      u[4 * l + 1] = static_cast<uint32_t>(w1[l]);
      u[4 * l + 2] = static_cast<uint32_t>(w2[l]);
      u[4 * l + 3] = static_cast<uint32_t>(w3[l]);
    }
    T* o = out + k;
    for (int e = 0; e < 4 * kLanes; ++e) o[e] = rule.multiplier(u[e]);
  }
  for (; k < count; k += 4, ++blk) {
    uint32_t w[4];
    s.block(blk, w[0], w[1], w[2], w[3]);
    for (int j = 0; j < 4 && k + j < count; ++j) out[k + j] = rule.multiplier(w[j]);
  }
}

// y[i] = x[i] * multiplier(i / group) for i in [lo, hi); x may equal y (in place).
template <typename S>
struct DropoutKernel {
  using T = at::opmath_type<S>;
  static FT_AI void run(const S* x, S* y, int64_t lo, int64_t hi, int64_t group, philox::Stream s,
                        dropout::KeepRule<T> rule) {
    alignas(64) T m[kChunk];
    if (group == 1) {
      for (int64_t c = lo; c < hi; c += kChunk) {
        const int64_t n = std::min(kChunk, hi - c);
        gen_multipliers(s, rule, static_cast<uint64_t>(c), n, m);
        const S* xs = x + c;
        S* ys = y + c;
#pragma GCC ivdep
        for (int64_t k = 0; k < n; ++k) ys[k] = static_cast<S>(static_cast<T>(xs[k]) * m[k]);
      }
      return;
    }
    const int64_t g_first = lo / group;
    const int64_t g_end = (hi - 1) / group + 1;
    for (int64_t gb = g_first; gb < g_end; gb += kChunk) {
      const int64_t ng = std::min(kChunk, g_end - gb);
      gen_multipliers(s, rule, static_cast<uint64_t>(gb), ng, m);
      for (int64_t j = 0; j < ng; ++j) {
        const int64_t a = std::max(lo, (gb + j) * group);
        const int64_t b = std::min(hi, (gb + j + 1) * group);
        const T mj = m[j];
#pragma GCC ivdep
        for (int64_t i = a; i < b; ++i) y[i] = static_cast<S>(static_cast<T>(x[i]) * mj);
      }
    }
  }
};

// out[i] = residual[i] + (x[i] + bias[i % H]) * multiplier(i), i in [lo, hi).
template <typename S>
struct BiasDropoutAddKernel {
  using T = at::opmath_type<S>;
  static FT_AI void run(const S* x, const T* bias, const S* res, S* out, int64_t lo, int64_t hi, int64_t H,
                        philox::Stream s, dropout::KeepRule<T> rule) {
    alignas(64) T m[kChunk];
    for (int64_t c = lo; c < hi; c += kChunk) {
      const int64_t n = std::min(kChunk, hi - c);
      gen_multipliers(s, rule, static_cast<uint64_t>(c), n, m);
      int64_t i = c;
      int64_t col = c % H;
      while (i < c + n) {
        const int64_t seg = std::min(H - col, c + n - i);
        const T* mk = m + (i - c);
        const S* xs = x + i;
        const S* rs = res + i;
        const T* bs = bias + col;
        S* os = out + i;
#pragma GCC ivdep
        for (int64_t k = 0; k < seg; ++k) {
          os[k] = static_cast<S>(
              dropout::bias_dropout_add(static_cast<T>(xs[k]), bs[k], static_cast<T>(rs[k]), mk[k]));
        }
        i += seg;
        col = 0;
      }
    }
  }
};

// gx[i] = g[i] * multiplier(i); acc[i % H] += gx[i] (as stored), i in [lo, hi).
template <typename S>
struct BiasDropoutAddBackwardKernel {
  using T = at::opmath_type<S>;
  static FT_AI void run(const S* g, S* gx, T* acc, int64_t lo, int64_t hi, int64_t H, philox::Stream s,
                        dropout::KeepRule<T> rule) {
    alignas(64) T m[kChunk];
    for (int64_t c = lo; c < hi; c += kChunk) {
      const int64_t n = std::min(kChunk, hi - c);
      gen_multipliers(s, rule, static_cast<uint64_t>(c), n, m);
      int64_t i = c;
      int64_t col = c % H;
      while (i < c + n) {
        const int64_t seg = std::min(H - col, c + n - i);
        const T* mk = m + (i - c);
        const S* gs = g + i;
        S* os = gx + i;
        T* as = acc + col;
#pragma GCC ivdep
        for (int64_t k = 0; k < seg; ++k) {
          const S v = static_cast<S>(static_cast<T>(gs[k]) * mk[k]);
          os[k] = v;
          as[k] += static_cast<T>(v);
        }
        i += seg;
        col = 0;
      }
    }
  }
};


void run_dropout(const at::Tensor& x, const at::Tensor& y, int64_t group, const philox::Stream& s, double p,
                 bool rescale) {
  const int64_t n = x.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedtrain_dropout_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto rule = dropout::make_rule<T>(p, rescale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, kGrainChunks, [&](int64_t b, int64_t e) {
      run_on_isa<DropoutKernel<scalar_t>>(xp, yp, b * kChunk, std::min(n, e * kChunk), group, s, rule);
    });
  });
}

struct Run {
  static void run(const at::Tensor& x, const at::Tensor& y, int64_t group, const philox::StreamArg& s, double p,
                  bool rescale) {
    run_dropout(x, y, group, host::host_stream(s), p, rescale);
  }
};

at::Tensor bias_dropout_add_cpu(const at::Tensor& input, const at::Tensor& bias, const at::Tensor& residual,
                                const at::Tensor& seed, int64_t offset, double p) {
  const host::BiasDropoutAdd a = host::prepare_bias_dropout_add(input, bias, residual, seed, offset, p);
  const philox::Stream s = host::host_stream(a.s);
  const at::Tensor& x = a.x;
  const at::Tensor& r = a.r;
  at::Tensor out = a.out;
  const int64_t n = a.n;
  if (n == 0) return out;
  const int64_t H = a.H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedtrain_bias_dropout_add_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto rule = dropout::make_rule<T>(p, true);
    const at::Tensor b = bias.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* bp = b.const_data_ptr<T>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, kGrainChunks, [&](int64_t cb, int64_t ce) {
      run_on_isa<BiasDropoutAddKernel<scalar_t>>(xp, bp, rp, op, cb * kChunk, std::min(n, ce * kChunk), H, s, rule);
    });
  });
  return out;
}

// Note [fused bias gradient]: the CPU backward computes grad_bias in the same pass as grad_input. The
// flat index space is cut into fixed blocks of at least kReduceBlock elements (and at least one row);
// each block sums its rows into its own row of `partial` (opmath), and the blocks' rows are added in
// block order at the end. The split does not depend on the thread count, so the result is reproducible.
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward_cpu(const at::Tensor& grad, const at::Tensor& seed,
                                                                 int64_t offset, double p, int64_t bias_numel) {
  const philox::Stream s =
      host::host_stream(host::check_bias_dropout_add_backward(grad, seed, offset, p, bias_numel));
  const at::Tensor g = grad.contiguous();
  at::Tensor gx = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  const int64_t H = bias_numel;
  at::Tensor gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fusedtrain_bda_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto rule = dropout::make_rule<T>(p, true);
    const int64_t block = (std::max(kReduceBlock, H) + kChunk - 1) / kChunk * kChunk;
    const int64_t blocks = (n + block - 1) / block;
    const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
    at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), H}, g.options().dtype(acc));
    T* pp = partial.data_ptr<T>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        run_on_isa<BiasDropoutAddBackwardKernel<scalar_t>>(gp, op, pp + b * H, b * block, std::min(n, (b + 1) * block),
                                                         H, s, rule);
      }
    });
    at::Tensor sum = at::empty({H}, partial.options());
    T* sp = sum.data_ptr<T>();
    at::parallel_for(0, H, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) sp[c] = T(0);
      for (int64_t b = 0; b < blocks; ++b) {
        const T* row = pp + b * H;
        for (int64_t c = c0; c < c1; ++c) sp[c] += row[c];
      }
    });
    gb = sum.to(g.scalar_type());
  });
  return std::make_tuple(gx, gb);
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("dropout", &fusedtrain::host::dropout_impl<fusedtrain::cpu::Run>);
  m.impl("dropout_", &fusedtrain::host::dropout_inplace_impl<fusedtrain::cpu::Run>);
  m.impl("bias_dropout_add", &fusedtrain::cpu::bias_dropout_add_cpu);
  m.impl("bias_dropout_add_backward", &fusedtrain::cpu::bias_dropout_add_backward_cpu);
}
