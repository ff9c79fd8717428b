// CPU driver of fusedtrain::adafactor_ (Note [Adafactor passes] in csrc/include/fusedtrain/adafactor.h).
//
// Note [Adafactor blocks]:
// One call updates all tensors of a (param group, dtype). Every tensor is cut into blocks, fixed by its
// shape alone: an unfactored (0-D / 1-D) tensor into ranges of kBlock elements; a factored one, seen as
// `batches` slices of m x n, into whole slices (as many as fit in ~kBlock elements) when a slice is small,
// else into row ranges of one slice (~kBlock elements, at least kMinRows rows). Three at::parallel_for
// regions run over the blocks of all tensors, split by element count (Note [CPU work split] in
// cpu_driver.h): 1. the sums of every block (and the row / column factors, Note [Adafactor passes]);
// 2. the update's squared norm of the factored blocks; 3. the update. Each block writes its own partial
// sums, combined per tensor in block order, so results do not depend on the number of threads. The
// column sums of a block of whole slices are the slices' complete sums (their col_var and R are finished
// by the block itself); the row-range blocks of a large slice keep one partial row of n sums each, added
// up in block order by the host after region 1 (kMinRows keeps that extra traffic under ~1/32 of the
// slice's). The inner loops are compiled for AVX-512, AVX2+FMA and the baseline ISA and picked at run
// time (Note [CPU SIMD dispatch] in cpu_driver.h); they write per-element terms into small buffers that
// separate `omp simd` loops sum (GCC leaves an in-order double reduction scalar otherwise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "fusedtrain/adafactor.h"
#include "fusedtrain/adafactor_host.h"
#include "fusedtrain/cpu_isa.h"

namespace fusedtrain {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;  // elements per block (about 256 KB of float32 g: L2-sized)
constexpr int64_t kMinRows = 64;     // rows per block of a large slice, at least (see the Note)
constexpr int64_t kChunk = 256;      // elements per buffered inner loop
constexpr int64_t kGrain = 1 << 14;  // elements per parallel_for grain: smaller calls run on one thread

#define FT_AF_INLINE inline __attribute__((always_inline))

// One tensor of the call, its state and its per-step scalars.
template <typename S>
struct Param {
  using T = at::opmath_type<S>;
  S* p;
  const S* g;
  S* row;   // factored: row_var (batches * m), col_var (batches * n), R per slice
  S* col;
  S* var;   // unfactored: variance
  T* rmean;
  int64_t numel, batches, m, n;  // factored: numel = batches * m * n; unfactored: m = n = 0
  T w;                           // one_minus_beta2_t
  double rho;
  T step;                        // -alpha / denom, once the norms are known
};

// A block (Note [Adafactor blocks]): elements [lo, hi) of an unfactored tensor, rows [lo, hi) of a
// factored one (whole slices when `whole`, else rows of one slice with partial column sums in col).
struct Block {
  int64_t param, lo, hi;
  int64_t col_at;  // where its column sums start in the call's column storage (-1: none kept)
  bool whole;
  double* col;
  double p_sq, u_sq;
};

template <typename S>
struct Ctx {
  using T = at::opmath_type<S>;
  std::vector<Param<S>> params;
  std::vector<Block> blocks;
  T inv, coef, sign, eps1, eps1_sq, decay;
};

// col_var and R of slice b from its complete column sums cs (n doubles); row_var of the slice is updated.
template <typename S>
FT_AF_INLINE void finish_slice(const Ctx<S>& c, const Param<S>& t, int64_t b, const double* cs) {
  using T = at::opmath_type<S>;
  const int64_t m = t.m, n = t.n;
  S* __restrict__ cv = t.col + b * n;
  for (int64_t j = 0; j < n; ++j) {
    cv[j] = static_cast<S>(math::lerp(static_cast<T>(cv[j]), adafactor::mean_square<S, T>(cs[j], m), t.w));
  }
  const S* __restrict__ rv = t.row + b * m;
  double acc = 0.0;
  for (int64_t i = 0; i < m; ++i) acc += static_cast<double>(static_cast<T>(rv[i]));
  t.rmean[b] = adafactor::row_mean<S, T>(acc, m, c.eps1);
}

// Region 1, unfactored: ||p||^2, variance <- lerp(variance, g*g, w), ||u||^2.
template <typename S>
FT_AF_INLINE void unfactored_sums(const Ctx<S>& c, Block& blk) {
  using T = at::opmath_type<S>;
  const Param<S>& t = c.params[blk.param];
  const S* __restrict__ p = t.p;
  const S* __restrict__ g = t.g;
  S* __restrict__ var = t.var;
  const T inv = c.inv, coef = c.coef, sign = c.sign, w = t.w, eps1_sq = c.eps1_sq;
  double pp[kChunk], uu[kChunk];
  double pacc = 0.0, uacc = 0.0;
  for (int64_t i0 = blk.lo; i0 < blk.hi; i0 += kChunk) {
    const int64_t len = std::min(kChunk, blk.hi - i0);
#pragma GCC ivdep
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = i0 + k;
      const double y = static_cast<double>(static_cast<T>(p[i]));
      pp[k] = y * y;
      const T x = adafactor::grad<S, T>(g[i], inv, coef, sign);
      const T v = adafactor::rnd<S>(math::lerp(static_cast<T>(var[i]), adafactor::rnd<S>(x * x), w));
      var[i] = static_cast<S>(v);
      const double u = static_cast<double>(adafactor::update<S>(v, x, eps1_sq));
      uu[k] = u * u;
    }
    double pa = 0.0, ua = 0.0;
#pragma omp simd reduction(+ : pa, ua)
    for (int64_t k = 0; k < len; ++k) {
      pa += pp[k];
      ua += uu[k];
    }
    pacc += pa;
    uacc += ua;
  }
  blk.p_sq = pacc;
  blk.u_sq = uacc;
}

// Region 1, factored: ||p||^2, squared row sums (row_var updated per row) and column sums.
template <typename S>
FT_AF_INLINE void factored_sums(const Ctx<S>& c, Block& blk) {
  using T = at::opmath_type<S>;
  const Param<S>& t = c.params[blk.param];
  const int64_t m = t.m, n = t.n;
  const int64_t b0 = blk.lo / m, b1 = (blk.hi - 1) / m;
  double* __restrict__ col = blk.col;
  std::fill(col, col + (b1 - b0 + 1) * n, 0.0);
  const T inv = c.inv, coef = c.coef, sign = c.sign;
  double sq[kChunk], pp[kChunk];
  double pacc = 0.0;
  for (int64_t r = blk.lo; r < blk.hi; ++r) {
    const S* __restrict__ gr = t.g + r * n;
    const S* __restrict__ pr = t.p + r * n;
    double* __restrict__ cb = col + (r / m - b0) * n;
    double racc = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t len = std::min(kChunk, n - j0);
#pragma GCC ivdep
      for (int64_t k = 0; k < len; ++k) {
        const double x = static_cast<double>(adafactor::grad<S, T>(gr[j0 + k], inv, coef, sign));
        const double y = static_cast<double>(static_cast<T>(pr[j0 + k]));
        sq[k] = x * x;
        pp[k] = y * y;
        cb[j0 + k] += x * x;
      }
      double ra = 0.0, pa = 0.0;
#pragma omp simd reduction(+ : ra, pa)
      for (int64_t k = 0; k < len; ++k) {
        ra += sq[k];
        pa += pp[k];
      }
      racc += ra;
      pacc += pa;
    }
    t.row[r] = static_cast<S>(math::lerp(static_cast<T>(t.row[r]), adafactor::mean_square<S, T>(racc, n), t.w));
  }
  blk.p_sq = pacc;
  if (blk.whole) {
    for (int64_t b = b0; b <= b1; ++b) finish_slice<S>(c, t, b, col + (b - b0) * n);
  }
}

// Region 1, factored 1 x 1 slices (1x1 conv kernels): every element is its own slice, so the row and
// column sums are its square and the loop runs over elements.
template <typename S>
FT_AF_INLINE void pointwise_sums(const Ctx<S>& c, Block& blk) {
  using T = at::opmath_type<S>;
  const Param<S>& t = c.params[blk.param];
  const S* __restrict__ p = t.p;
  const S* __restrict__ g = t.g;
  S* __restrict__ row = t.row;
  S* __restrict__ col = t.col;
  T* __restrict__ rmean = t.rmean;
  const T inv = c.inv, coef = c.coef, sign = c.sign, w = t.w, eps1 = c.eps1;
  double pp[kChunk];
  double pacc = 0.0;
  for (int64_t i0 = blk.lo; i0 < blk.hi; i0 += kChunk) {
    const int64_t len = std::min(kChunk, blk.hi - i0);
#pragma GCC ivdep
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = i0 + k;
      const double x = static_cast<double>(adafactor::grad<S, T>(g[i], inv, coef, sign));
      const double y = static_cast<double>(static_cast<T>(p[i]));
      pp[k] = y * y;
      const T ms = adafactor::mean_square<S, T>(x * x, 1);
      const S r = static_cast<S>(math::lerp(static_cast<T>(row[i]), ms, w));
      row[i] = r;
      col[i] = static_cast<S>(math::lerp(static_cast<T>(col[i]), ms, w));
      rmean[i] = adafactor::row_mean<S, T>(static_cast<double>(static_cast<T>(r)), 1, eps1);
    }
    double pa = 0.0;
#pragma omp simd reduction(+ : pa)
    for (int64_t k = 0; k < len; ++k) pa += pp[k];
    pacc += pa;
  }
  blk.p_sq = pacc;
}

// Region 2, factored: ||u||^2 of the block's rows.
template <typename S>
FT_AF_INLINE void factored_update_norm(const Ctx<S>& c, Block& blk) {
  using T = at::opmath_type<S>;
  const Param<S>& t = c.params[blk.param];
  const int64_t m = t.m, n = t.n;
  const T inv = c.inv, coef = c.coef, sign = c.sign, eps1_sq = c.eps1_sq;
  double uu[kChunk];
  double uacc = 0.0;
  if (m == 1 && n == 1) {
    const S* __restrict__ g = t.g;
    const S* __restrict__ row = t.row;
    const S* __restrict__ col = t.col;
    const T* __restrict__ rmean = t.rmean;
    for (int64_t i0 = blk.lo; i0 < blk.hi; i0 += kChunk) {
      const int64_t len = std::min(kChunk, blk.hi - i0);
#pragma GCC ivdep
      for (int64_t k = 0; k < len; ++k) {
        const int64_t i = i0 + k;
        const T v = adafactor::factored_estimate<S>(static_cast<T>(row[i]), static_cast<T>(col[i]), rmean[i]);
        const double u = static_cast<double>(
            adafactor::update<S>(v, adafactor::grad<S, T>(g[i], inv, coef, sign), eps1_sq));
        uu[k] = u * u;
      }
      double ua = 0.0;
#pragma omp simd reduction(+ : ua)
      for (int64_t k = 0; k < len; ++k) ua += uu[k];
      uacc += ua;
    }
    blk.u_sq = uacc;
    return;
  }
  for (int64_t r = blk.lo; r < blk.hi; ++r) {
    const int64_t b = r / m;
    const T rv = static_cast<T>(t.row[r]), rm = t.rmean[b];
    const S* __restrict__ gr = t.g + r * n;
    const S* __restrict__ cv = t.col + b * n;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t len = std::min(kChunk, n - j0);
#pragma GCC ivdep
      for (int64_t k = 0; k < len; ++k) {
        const T v = adafactor::factored_estimate<S>(rv, static_cast<T>(cv[j0 + k]), rm);
        const double u = static_cast<double>(
            adafactor::update<S>(v, adafactor::grad<S, T>(gr[j0 + k], inv, coef, sign), eps1_sq));
        uu[k] = u * u;
      }
      double ua = 0.0;
#pragma omp simd reduction(+ : ua)
      for (int64_t k = 0; k < len; ++k) ua += uu[k];
      uacc += ua;
    }
  }
  blk.u_sq = uacc;
}

// Region 3: p <- p * decay + step * u.
template <typename S>
FT_AF_INLINE void apply_block(const Ctx<S>& c, const Block& blk) {
  using T = at::opmath_type<S>;
  const Param<S>& t = c.params[blk.param];
  const T inv = c.inv, coef = c.coef, sign = c.sign, eps1_sq = c.eps1_sq, decay = c.decay, step = t.step;
  if (t.n == 0 || (t.m == 1 && t.n == 1)) {  // unfactored, or 1 x 1 slices: element-wise
    S* __restrict__ p = t.p;
    const S* __restrict__ g = t.g;
    const S* __restrict__ var = t.var;
    const S* __restrict__ row = t.row;
    const S* __restrict__ col = t.col;
    const T* __restrict__ rmean = t.rmean;
    if (t.n == 0) {
#pragma GCC ivdep
      for (int64_t i = blk.lo; i < blk.hi; ++i) {
        const T u = adafactor::update<S>(static_cast<T>(var[i]), adafactor::grad<S, T>(g[i], inv, coef, sign),
                                         eps1_sq);
        p[i] = static_cast<S>(adafactor::apply<S>(static_cast<T>(p[i]), u, decay, step));
      }
    } else {
#pragma GCC ivdep
      for (int64_t i = blk.lo; i < blk.hi; ++i) {
        const T v = adafactor::factored_estimate<S>(static_cast<T>(row[i]), static_cast<T>(col[i]), rmean[i]);
        const T u = adafactor::update<S>(v, adafactor::grad<S, T>(g[i], inv, coef, sign), eps1_sq);
        p[i] = static_cast<S>(adafactor::apply<S>(static_cast<T>(p[i]), u, decay, step));
      }
    }
    return;
  }
  const int64_t m = t.m, n = t.n;
  for (int64_t r = blk.lo; r < blk.hi; ++r) {
    const int64_t b = r / m;
    const T rv = static_cast<T>(t.row[r]), rm = t.rmean[b];
    const S* __restrict__ gr = t.g + r * n;
    const S* __restrict__ cv = t.col + b * n;
    S* __restrict__ pr = t.p + r * n;
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const T v = adafactor::factored_estimate<S>(rv, static_cast<T>(cv[j]), rm);
      const T u = adafactor::update<S>(v, adafactor::grad<S, T>(gr[j], inv, coef, sign), eps1_sq);
      pr[j] = static_cast<S>(adafactor::apply<S>(static_cast<T>(pr[j]), u, decay, step));
    }
  }
}

template <typename S>
FT_AF_INLINE void region1_body(const Ctx<S>& c, Block& blk) {
  const Param<S>& t = c.params[blk.param];
  if (t.n == 0) {
    unfactored_sums<S>(c, blk);
  } else if (t.m == 1 && t.n == 1) {
    pointwise_sums<S>(c, blk);
  } else {
    factored_sums<S>(c, blk);
  }
}

// The per-ISA copies (Note [CPU SIMD dispatch] in cpu_driver.h): the bodies above are always_inline, so
// each copy is compiled, and vectorized, for its target.
template <typename S>
struct Kernels {
  void (*region1)(const Ctx<S>&, Block&);
  void (*region2)(const Ctx<S>&, Block&);
  void (*region3)(const Ctx<S>&, const Block&);
};

#define FT_AF_COPIES(SUFFIX, ATTR)                                                                      \
  template <typename S>                                                                                 \
  ATTR void region1_##SUFFIX(const Ctx<S>& c, Block& b) { region1_body<S>(c, b); }                     \
  template <typename S>                                                                                 \
  ATTR void region2_##SUFFIX(const Ctx<S>& c, Block& b) { factored_update_norm<S>(c, b); }             \
  template <typename S>                                                                                 \
  ATTR void region3_##SUFFIX(const Ctx<S>& c, const Block& b) { apply_block<S>(c, b); }                \
  template <typename S>                                                                                 \
  Kernels<S> kernels_##SUFFIX() {                                                                       \
    return Kernels<S>{&region1_##SUFFIX<S>, &region2_##SUFFIX<S>, &region3_##SUFFIX<S>};               \
  }

FT_AF_COPIES(baseline, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FT_AF_X86 1
FT_AF_COPIES(avx2, __attribute__((target("avx2,fma,f16c"))))
FT_AF_COPIES(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))))
#endif

template <typename S>
Kernels<S> select_kernels() {
#ifdef FT_AF_X86
  switch (active_isa()) {
    case Isa::kAvx512:
      return kernels_avx512<S>();
    case Isa::kAvx2:
      return kernels_avx2<S>();
    default:
      break;
  }
#endif
  return kernels_baseline<S>();
}

// Runs f(block) for the blocks `ids` (of sizes `size`), split across threads by element count: a range
// [begin, end) of the running total takes the blocks that start in it (Note [CPU work split]).
template <typename F>
void for_blocks(const std::vector<int64_t>& ids, const std::vector<int64_t>& size, F&& f) {
  std::vector<int64_t> start(ids.size() + 1, 0);
  for (size_t i = 0; i < ids.size(); ++i) start[i + 1] = start[i] + size[ids[i]];
  const int64_t total = start.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t i = std::lower_bound(start.begin(), start.end() - 1, begin) - start.begin();
    for (; i < ids.size() && start[i] < end; ++i) f(ids[i]);
  });
}

template <typename S>
struct Driver {
  static void run(adafactor::Lists& l, const adafactor::Scalars& s);
};

template <typename S>
void Driver<S>::run(adafactor::Lists& l, const adafactor::Scalars& s) {
  using T = at::opmath_type<S>;
  Ctx<S> c;
  c.inv = T(s.inv_scale);
  c.coef = T(s.clip_coef);
  c.sign = T(s.sign);
  c.eps1 = T(s.eps1);
  c.eps1_sq = T(s.eps1 * s.eps1);
  c.decay = T(s.decay);
  const size_t np = l.params.size();
  c.params.resize(np);
  // Storage for the column sums of whole-slice blocks, the partial rows of large-slice blocks and R.
  std::vector<int64_t> rmean_at(np, 0);
  int64_t col_total = 0, rmean_total = 0;
  size_t fi = 0, ui = 0;
  for (size_t i = 0; i < np; ++i) {
    Param<S>& t = c.params[i];
    const at::Tensor& p = l.params[i].work;
    t.p = p.data_ptr<S>();
    t.g = l.grads[i].data_ptr<S>();
    t.numel = p.numel();
    t.w = T(adafactor::one_minus_beta2(s.steps[i], s.beta2_decay));
    t.rho = adafactor::rho(s.steps[i], s.lr);
    t.row = t.col = t.var = nullptr;
    t.rmean = nullptr;
    if (p.dim() > 1) {
      t.row = l.rows[fi].work.data_ptr<S>();
      t.col = l.cols[fi].work.data_ptr<S>();
      ++fi;
      t.n = p.size(-1);
      t.m = p.size(-2);
      t.batches = t.numel / (t.m * t.n);
      rmean_at[i] = rmean_total;
      rmean_total += t.batches;
      const int64_t target = std::max<int64_t>(kMinRows, (kBlock + t.n - 1) / t.n);
      const int64_t rows_total = t.batches * t.m;
      if (t.m == 1 && t.n == 1) {  // 1 x 1 slices: element blocks, no column sums kept
        for (int64_t lo = 0; lo < rows_total; lo += kBlock) {
          c.blocks.push_back(Block{int64_t(i), lo, std::min(rows_total, lo + kBlock), -1, true, nullptr, 0, 0});
        }
      } else if (t.m <= target) {  // whole slices
        const int64_t per = (target / t.m) * t.m;
        for (int64_t lo = 0; lo < rows_total; lo += per) {
          c.blocks.push_back(Block{int64_t(i), lo, std::min(rows_total, lo + per), col_total + (lo / t.m) * t.n,
                                   true, nullptr, 0, 0});
        }
        col_total += t.batches * t.n;
      } else {  // rows of one slice each, ~target rows, one partial row of column sums per block
        const int64_t k = (t.m + target - 1) / target;
        for (int64_t b = 0; b < t.batches; ++b) {
          for (int64_t q = 0; q < k; ++q) {
            c.blocks.push_back(Block{int64_t(i), b * t.m + t.m * q / k, b * t.m + t.m * (q + 1) / k, col_total,
                                     false, nullptr, 0, 0});
            col_total += t.n;
          }
        }
      }
    } else {
      t.var = l.vars[ui++].work.data_ptr<S>();
      t.m = t.n = 0;
      t.batches = 0;
      for (int64_t lo = 0; lo < t.numel; lo += kBlock) {
        c.blocks.push_back(Block{int64_t(i), lo, std::min(t.numel, lo + kBlock), -1, true, nullptr, 0, 0});
      }
    }
  }
  std::unique_ptr<double[]> col_store(new double[std::max<int64_t>(col_total, 1)]);
  std::unique_ptr<T[]> rmean_store(new T[std::max<int64_t>(rmean_total, 1)]);
  for (size_t i = 0; i < np; ++i) {
    if (c.params[i].n > 0) c.params[i].rmean = rmean_store.get() + rmean_at[i];
  }
  std::vector<int64_t> all, factored, block_size(c.blocks.size());
  all.reserve(c.blocks.size());
  for (size_t k = 0; k < c.blocks.size(); ++k) {
    Block& b = c.blocks[k];
    const Param<S>& t = c.params[b.param];
    block_size[k] = (b.hi - b.lo) * std::max<int64_t>(t.n, 1);
    all.push_back(int64_t(k));
    if (t.n > 0) factored.push_back(int64_t(k));
    if (b.col_at >= 0) b.col = col_store.get() + b.col_at;
  }
  const Kernels<S> kern = select_kernels<S>();
  for_blocks(all, block_size, [&](int64_t k) { kern.region1(c, c.blocks[k]); });
  // The large slices: column sums in block order, then col_var and R (small: n per block, m per slice).
  std::vector<double> cs;
  for (size_t k = 0; k < c.blocks.size();) {
    const Block& b = c.blocks[k];
    const Param<S>& t = c.params[b.param];
    if (b.whole) {
      ++k;
      continue;
    }
    const int64_t slice = b.lo / t.m;
    cs.assign(t.n, 0.0);
    for (; k < c.blocks.size() && !c.blocks[k].whole && c.blocks[k].param == b.param &&
           c.blocks[k].lo / t.m == slice;
         ++k) {
      const double* part = c.blocks[k].col;
      for (int64_t j = 0; j < t.n; ++j) cs[j] += part[j];
    }
    finish_slice<S>(c, t, slice, cs.data());
  }
  for_blocks(factored, block_size, [&](int64_t k) { kern.region2(c, c.blocks[k]); });
  // Each tensor's norms, its blocks' sums in block order, and its step size.
  std::vector<double> p_sq(np, 0.0), u_sq(np, 0.0);
  for (const Block& b : c.blocks) {
    p_sq[b.param] += b.p_sq;
    u_sq[b.param] += b.u_sq;
  }
  for (size_t i = 0; i < np; ++i) {
    Param<S>& t = c.params[i];
    t.step = T(adafactor::step_size<S, T>(p_sq[i], u_sq[i], t.numel, s.eps2, t.rho, s.d));
  }
  for_blocks(all, block_size, [&](int64_t k) { kern.region3(c, c.blocks[k]); });
}

void adafactor_cpu(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                   at::TensorList variances, at::TensorList state_steps, double beta2_decay, double eps1,
                   double eps2, double lr, double decay, bool apply_decay, double d, bool maximize, double inv_scale,
                   double clip_coef, bool check_only) {
  adafactor::op<Driver>(params, grads, row_vars, col_vars, variances, state_steps, beta2_decay, eps1, eps2, lr, decay,
                        apply_decay, d, maximize, inv_scale, clip_coef, check_only, c10::DeviceType::CPU);
}

}  // namespace
}  // namespace cpu
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) { m.impl("adafactor_", &fusedtrain::cpu::adafactor_cpu); }
