// CPU implementation of the AdaLN ops (the binding, adaln.cpp, checks and normalises the inputs first).
//
// Rows are processed in parallel (at::parallel_for). Every reduction -- the row sums, and the sums over
// tokens / samples of the parameter and per-sample modulation gradients -- runs in an order fixed by
// the shape alone: rows are grouped in blocks of cpu_rows_per_block(N) tokens of one sample, each block
// writes one fp32 partial row, and the partials are added in index order. Results are bitwise
// identical for any thread count.
#include "adaln_cpu.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RECTOK_CPU_STREAM 1
#endif

namespace rectok {

namespace {
std::atomic<bool> g_poison{false};
}

bool poison_outputs() { return g_poison.load(); }
void set_poison_outputs(bool on) { g_poison.store(on); }

at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  // CPU: allocate directly (as TensorIterator does for torch.add's output), not through a dispatcher call.
  if (options.device().is_cpu())
    return at::detail::empty_cpu(sizes, options.dtype().toScalarType(), /*pin_memory=*/false, std::nullopt);
  return at::empty(sizes, options);
}

namespace cpu {
namespace {

using bf16 = c10::BFloat16;

// Tokens of one sample per backward block: fixed by the shape only.
int64_t cpu_rows_per_block(int64_t N) { return N < 32 ? (N < 1 ? 1 : N) : 32; }

template <typename S>
inline float round_through(float v) { return static_cast<float>(static_cast<S>(v)); }
template <>
inline float round_through<float>(float v) { return v; }

// The per-row loops below are compiled twice on x86-64 GCC: for x86-64-v3 (AVX2 + FMA) and the
// baseline; the loader picks one per process (ifunc). Every pointer argument is __restrict__ so the
// loops vectorize.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(RECTOK_FAST_NO_CPU_CLONES)
#define RECTOK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RECTOK_CPU_CLONES
#endif

// Sum of p[d] * q[d] with 16 independent accumulators (vectorizes; fixed order).
RECTOK_CPU_CLONES float dot16(const float* __restrict__ p, const float* __restrict__ q, int64_t D) {
  float acc[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int k = 0; k < 16; ++k) acc[k] += p[d + k] * q[d + k];
  float s = 0.f;
  for (; d < D; ++d) s += p[d] * q[d];
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// Convert one row to fp32 (a no-op copy avoided for float inputs by the callers).
template <typename S>
inline const float* as_float(const S* __restrict__ p, int64_t D, float* __restrict__ buf) {
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(p[d]);
  return buf;
}
template <>
inline const float* as_float<float>(const float* __restrict__ p, int64_t, float*) { return p; }

template <typename S>
inline void store_row(S* __restrict__ out, const float* __restrict__ v, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<S>(v[d]);
}

RECTOK_CPU_CLONES void accumulate(float* __restrict__ acc, const float* __restrict__ v, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += v[d];
}

// One row of the backward, first pass (all pointers distinct, so the loop vectorizes):
// aw += gs * xr (weight grad), g = gs * w (grad of xhat), xh = x * rstd, dsc = dy * xr * w (scale grad).
// round_bf16: the activations are bf16, so the normalised row is rounded to bf16 (as the reference does).
template <bool ROUND>
inline void adaln_bwd_row_impl(const float* __restrict__ xf, const float* __restrict__ gy, const float* __restrict__ s1,
                               const float* __restrict__ w, float r, int64_t D, float* __restrict__ aw,
                               float* __restrict__ g, float* __restrict__ xh, float* __restrict__ dsc) {
  for (int64_t d = 0; d < D; ++d) {
    const float h = xf[d] * r;
    const float xr = ROUND ? round_through<bf16>(h) : h;
    const float gs = gy[d] * (1.f + s1[d]);  // d out / d (xr * w)
    aw[d] += gs * xr;
    g[d] = gs * w[d];                        // d out / d xhat
    xh[d] = h;
    dsc[d] = gy[d] * (xr * w[d]);
  }
}

RECTOK_CPU_CLONES void adaln_bwd_row(const float* __restrict__ xf, const float* __restrict__ gy,
                                     const float* __restrict__ s1, const float* __restrict__ w, float r, int64_t D,
                                     bool round_bf16, float* __restrict__ aw, float* __restrict__ g,
                                     float* __restrict__ xh, float* __restrict__ dsc) {
  if (round_bf16) adaln_bwd_row_impl<true>(xf, gy, s1, w, r, D, aw, g, xh, dsc);
  else adaln_bwd_row_impl<false>(xf, gy, s1, w, r, D, aw, g, xh, dsc);
}

template <bool ROUND>
inline void adaln_fwd_row_impl(const float* __restrict__ xf, const float* __restrict__ w,
                               const float* __restrict__ s0, const float* __restrict__ s1, float r, int64_t D,
                               float* __restrict__ o) {
  for (int64_t d = 0; d < D; ++d) {
    const float h = xf[d] * r;
    const float a = (ROUND ? round_through<bf16>(h) : h) * w[d];
    o[d] = a * (1.f + s1[d]) + s0[d];
  }
}

RECTOK_CPU_CLONES void adaln_fwd_row(const float* __restrict__ xf, const float* __restrict__ w,
                                     const float* __restrict__ s0, const float* __restrict__ s1, float r, int64_t D,
                                     bool round_bf16, float* __restrict__ o) {
  if (round_bf16) adaln_fwd_row_impl<true>(xf, w, s0, s1, r, D, o);
  else adaln_fwd_row_impl<false>(xf, w, s0, s1, r, D, o);
}

RECTOK_CPU_CLONES void gated_fwd_row(const float* __restrict__ xf, const float* __restrict__ gf,
                                     const float* __restrict__ yf, int64_t D, float* __restrict__ o) {
  for (int64_t d = 0; d < D; ++d) o[d] = xf[d] + gf[d] * yf[d];
}

// t = dout * y (gate grad), dyo = gate * dout (grad of y)
RECTOK_CPU_CLONES void gated_bwd_row(const float* __restrict__ of, const float* __restrict__ yf,
                                     const float* __restrict__ gf, int64_t D, float* __restrict__ t,
                                     float* __restrict__ dyo) {
  for (int64_t d = 0; d < D; ++d) {
    t[d] = of[d] * yf[d];
    dyo[d] = gf[d] * of[d];
  }
}

// Outputs at least this large are written with non-temporal (streaming) stores when everything is
// fp32: a normal store first reads the destination line (write-allocate), so a streamed output costs
// one pass over memory instead of two, and it does not evict the inputs from the caches. Smaller
// outputs are stored normally: the next op reads them from cache.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

#ifdef RECTOK_CPU_STREAM
inline bool aligned16(const float* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// A per-token modulation is a strided view (rows of D inside (B, N, 6D) adaLN rows): each of its rows
// is a separate short stream that the hardware prefetchers pick up late. Measured on this project's
// CPU (Zen 5), prefetching the next row's modulation while the current row streams cut the per-token
// gated residual's time about 2.5x. One row ahead covers the memory latency many times over.
inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

// o = x + g * y (a multiply, then an add: the reference's two roundings), o streamed; g_next: the next
// row's gate to prefetch (nullptr: none, e.g. a per-sample gate, which stays in cache).
void gated_fwd_row_stream(const float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ y,
                          int64_t D, float* __restrict__ o, const float* g_next) {
  int64_t d = 0;
  for (; d < D && !aligned16(o + d); ++d) o[d] = x[d] + g[d] * y[d];
  const int64_t d0 = d;
  for (; d + 8 <= D; d += 8) {
    if (g_next != nullptr && ((d - d0) & 15) == 0) prefetch(g_next + d);  // one per 64-byte line
    const __m128 a = _mm_add_ps(_mm_loadu_ps(x + d), _mm_mul_ps(_mm_loadu_ps(g + d), _mm_loadu_ps(y + d)));
    const __m128 b = _mm_add_ps(_mm_loadu_ps(x + d + 4), _mm_mul_ps(_mm_loadu_ps(g + d + 4), _mm_loadu_ps(y + d + 4)));
    _mm_stream_ps(o + d, a);
    _mm_stream_ps(o + d + 4, b);
  }
  for (; d < D; ++d) o[d] = x[d] + g[d] * y[d];
}

// dy = g * dout, streamed; per token dg = dout * y streamed too, per sample accumulated into acc.
template <bool TOKEN>
void gated_bwd_row_stream(const float* __restrict__ dout, const float* __restrict__ y, const float* __restrict__ g,
                          int64_t D, float* __restrict__ dg, float* __restrict__ dy, const float* g_next) {
  int64_t d = 0;
  auto scalar = [&](int64_t i) {
    const float t = dout[i] * y[i];
    if (TOKEN) dg[i] = t;
    else dg[i] += t;
    dy[i] = g[i] * dout[i];
  };
  // dy and a per-token dg come from tensors of the same shape and alignment: one peel serves both.
  for (; d < D && !aligned16(dy + d); ++d) scalar(d);
  const bool dg_aligned = !TOKEN || aligned16(dg + d);
  const int64_t d0 = d;
  for (; d + 4 <= D; d += 4) {
    if (g_next != nullptr && ((d - d0) & 15) == 0) prefetch(g_next + d);
    const __m128 o = _mm_loadu_ps(dout + d);
    const __m128 t = _mm_mul_ps(o, _mm_loadu_ps(y + d));
    if (TOKEN) {
      if (dg_aligned) _mm_stream_ps(dg + d, t);
      else _mm_storeu_ps(dg + d, t);
    } else {
      _mm_storeu_ps(dg + d, _mm_add_ps(_mm_loadu_ps(dg + d), t));
    }
    _mm_stream_ps(dy + d, _mm_mul_ps(_mm_loadu_ps(g + d), o));
  }
  for (; d < D; ++d) scalar(d);
}
#endif

// dx = rstd * (g - xhat * mean(g * xhat))
RECTOK_CPU_CLONES void adaln_dx_row(const float* __restrict__ g, const float* __restrict__ xh, float r, float m, int64_t D,
                         float* __restrict__ o) {
  for (int64_t d = 0; d < D; ++d) o[d] = r * (g[d] - xh[d] * m);
}

// Staging rows of one parallel chunk: on the stack for small rows (no heap allocation per call on
// small tensors), else on the heap.
class RowBuffer {
 public:
  explicit RowBuffer(int64_t n) {
    if (n > kStack) heap_.resize(size_t(n));
  }
  float* data() { return heap_.empty() ? stack_ : heap_.data(); }

 private:
  static constexpr int64_t kStack = 512;
  float stack_[kStack];
  std::vector<float> heap_;
};

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

template <typename T, typename M>
void cpu_adaln_fwd(const at::Tensor& x, const float* w, const ModView& sh, const ModView& sc, float eps,
                   at::Tensor& out, at::Tensor& rstd) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* rp = rstd.data_ptr<float>();
  const M* shp = static_cast<const M*>(sh.ptr);
  const M* scp = static_cast<const M*>(sc.ptr);
  at::parallel_for(0, B * N, row_grain(D), [&](int64_t begin, int64_t end) {
    RowBuffer buf(4 * D);
    float *xb = buf.data(), *shb = xb + D, *scb = shb + D, *ob = scb + D;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row - b * N;
      const float* xf = as_float<T>(xp + row * D, D, xb);
      const float r = 1.f / std::sqrt(dot16(xf, xf, D) / float(D) + eps);
      rp[row] = r;
      const float* s0 = as_float<M>(shp + b * sh.sb + n * sh.sn, D, shb);
      const float* s1 = as_float<M>(scp + b * sc.sb + n * sc.sn, D, scb);
      float* o = std::is_same<T, float>::value ? reinterpret_cast<float*>(op + row * D) : ob;
      adaln_fwd_row(xf, w, s0, s1, r, D, !std::is_same<T, float>::value, o);
      if (!std::is_same<T, float>::value) store_row<T>(op + row * D, ob, D);
    }
  });
}

// Sum `rows` partial rows per group in index order: out[g, d] = sum_i part[g*rows + i, d].
template <typename O>
void cpu_sum_partials(const float* part, int64_t groups, int64_t rows, int64_t D, O* out) {
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> acc(D);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        const float* p = part + (g * rows + i) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += p[d];
      }
      store_row<O>(out + g * D, acc.data(), D);
    }
  });
}

template <typename O>
void sum_partials_into(const at::Tensor& part, int64_t groups, int64_t rows, int64_t D, at::Tensor& out) {
  cpu_sum_partials<O>(part.data_ptr<float>(), groups, rows, D, out.data_ptr<O>());
}

void sum_partials_any(const at::Tensor& part, int64_t groups, int64_t rows, int64_t D, at::Tensor& out) {
  if (out.scalar_type() == at::kFloat) sum_partials_into<float>(part, groups, rows, D, out);
  else sum_partials_into<bf16>(part, groups, rows, D, out);
}

template <typename T, typename M>
void cpu_adaln_bwd(const at::Tensor& dy, const at::Tensor& x, const float* w, const ModView& sc,
                   const at::Tensor& rstd, bool shift_tok, bool scale_tok, at::Tensor& dx, at::Tensor& dweight,
                   at::Tensor& dshift, at::Tensor& dscale) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t R = cpu_rows_per_block(N), nchunks = (N + R - 1) / R;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor wpart = new_buffer({B * nchunks, D}, f32);
  at::Tensor shpart = shift_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  at::Tensor scpart = scale_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  const T* xp = x.data_ptr<T>();
  const T* gp = dy.data_ptr<T>();
  const float* rp = rstd.data_ptr<float>();
  const M* scp = static_cast<const M*>(sc.ptr);
  T* dxp = dx.data_ptr<T>();
  M* dscp = scale_tok ? dscale.data_ptr<M>() : nullptr;
  float* wpp = wpart.data_ptr<float>();
  float* shpp = shift_tok ? nullptr : shpart.data_ptr<float>();
  float* scpp = scale_tok ? nullptr : scpart.data_ptr<float>();

  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    RowBuffer buf(7 * D);
    float *xb = buf.data(), *gb = xb + D, *scb = gb + D, *xh = scb + D, *g = xh + D, *dsc = g + D, *tb = dsc + D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, c = task - b * nchunks;
      const int64_t n0 = c * R, n1 = std::min(N, n0 + R);
      float* aw = wpp + task * D;
      float* ash = shift_tok ? nullptr : shpp + task * D;
      float* asc = scale_tok ? nullptr : scpp + task * D;
      std::fill(aw, aw + D, 0.f);
      if (ash) std::fill(ash, ash + D, 0.f);
      if (asc) std::fill(asc, asc + D, 0.f);
      const float* s1 = scale_tok ? nullptr : as_float<M>(scp + b * sc.sb, D, scb);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        const float* xf = as_float<T>(xp + row * D, D, xb);
        const float* gy = as_float<T>(gp + row * D, D, gb);
        if (scale_tok) s1 = as_float<M>(scp + b * sc.sb + n * sc.sn, D, scb);
        const float r = rp[row];
        adaln_bwd_row(xf, gy, s1, w, r, D, !std::is_same<T, float>::value, aw, g, xh, dsc);
        if (!shift_tok) accumulate(ash, gy, D);  // per-token dshift is dy itself: nothing to write
        if (scale_tok) store_row<M>(dscp + row * D, dsc, D);
        else accumulate(asc, dsc, D);
        const float m = dot16(g, xh, D) / float(D);
        float* o = std::is_same<T, float>::value ? reinterpret_cast<float*>(dxp + row * D) : tb;
        adaln_dx_row(g, xh, r, m, D, o);
        if (!std::is_same<T, float>::value) store_row<T>(dxp + row * D, tb, D);
      }
    }
  });
  sum_partials_any(wpart, 1, B * nchunks, D, dweight);
  if (!shift_tok) sum_partials_any(shpart, B, nchunks, D, dshift);
  if (!scale_tok) sum_partials_any(scpart, B, nchunks, D, dscale);
}

template <typename T, typename Y, typename M>
void cpu_gated_fwd(const at::Tensor& x, const ModView& gate, const at::Tensor& y, at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const T* xp = x.data_ptr<T>();
  const Y* yp = y.data_ptr<Y>();
  const M* gp = static_cast<const M*>(gate.ptr);
  T* op = out.data_ptr<T>();
  constexpr bool all_f32 = std::is_same_v<T, float> && std::is_same_v<Y, float> && std::is_same_v<M, float>;
  [[maybe_unused]] const bool stream = all_f32 && int64_t(out.nbytes()) >= kStreamBytes;
  at::parallel_for(0, B * N, row_grain(D), [&](int64_t begin, int64_t end) {
    // staging rows for bf16 (fp32 rows are read in place); on the stack for small D
    RowBuffer buf(4 * D);
    float *xb = buf.data(), *yb = xb + D, *gb = yb + D, *ob = gb + D;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row - b * N;
      const float* xf = as_float<T>(xp + row * D, D, xb);
      const float* yf = as_float<Y>(yp + row * D, D, yb);
      const float* gf = as_float<M>(gp + b * gate.sb + n * gate.sn, D, gb);
      float* o = std::is_same<T, float>::value ? reinterpret_cast<float*>(op + row * D) : ob;
#ifdef RECTOK_CPU_STREAM
      if (stream) {
        const float* g_next = (gate.per_token && row + 1 < end)
                                  ? reinterpret_cast<const float*>(gp + (row + 1) / N * gate.sb + (row + 1) % N * gate.sn)
                                  : nullptr;
        gated_fwd_row_stream(xf, gf, yf, D, o, g_next);
        continue;
      }
#endif
      gated_fwd_row(xf, gf, yf, D, o);
      if (!std::is_same<T, float>::value) store_row<T>(op + row * D, ob, D);
    }
#ifdef RECTOK_CPU_STREAM
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
#endif
  });
}

template <typename T, typename Y, typename M>
void cpu_gated_bwd(const at::Tensor& dout, const ModView& gate, const at::Tensor& y, at::Tensor& dgate,
                   at::Tensor& dy) {
  const int64_t B = dout.size(0), N = dout.size(1), D = dout.size(2);
  const int64_t R = cpu_rows_per_block(N), nchunks = (N + R - 1) / R;
  const bool tok = gate.per_token;
  at::Tensor gpart = tok ? at::Tensor() : new_buffer({B * nchunks, D}, dout.options().dtype(at::kFloat));
  const T* op = dout.data_ptr<T>();
  const Y* yp = y.data_ptr<Y>();
  const M* gp = static_cast<const M*>(gate.ptr);
  Y* dyp = dy.data_ptr<Y>();
  M* dgp = tok ? dgate.data_ptr<M>() : nullptr;
  float* gpp = tok ? nullptr : gpart.data_ptr<float>();
  constexpr bool all_f32 = std::is_same_v<T, float> && std::is_same_v<Y, float> && std::is_same_v<M, float>;
  [[maybe_unused]] const bool stream = all_f32 && int64_t(dy.nbytes()) >= kStreamBytes;
  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    RowBuffer buf(5 * D);
    float *ob = buf.data(), *yb = ob + D, *gb = yb + D, *t = gb + D, *u = t + D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, c = task - b * nchunks;
      const int64_t n0 = c * R, n1 = std::min(N, n0 + R);
      float* acc = tok ? nullptr : gpp + task * D;
      if (acc) std::fill(acc, acc + D, 0.f);
      const float* gf = tok ? nullptr : as_float<M>(gp + b * gate.sb, D, gb);
#ifdef RECTOK_CPU_STREAM
      if (stream) {  // fp32: read in place, dy (and a per-token dgate) streamed
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t row = b * N + n;
          const float* of = reinterpret_cast<const float*>(op + row * D);
          const float* yf = reinterpret_cast<const float*>(yp + row * D);
          float* dyo = reinterpret_cast<float*>(dyp + row * D);
          if (tok) {
            gf = reinterpret_cast<const float*>(gp + b * gate.sb + n * gate.sn);
            const float* g_next = n + 1 < n1 ? gf + gate.sn : nullptr;
            gated_bwd_row_stream<true>(of, yf, gf, D, reinterpret_cast<float*>(dgp + row * D), dyo, g_next);
          } else {
            gated_bwd_row_stream<false>(of, yf, gf, D, acc, dyo, nullptr);
          }
        }
        continue;
      }
#endif
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        const float* of = as_float<T>(op + row * D, D, ob);
        const float* yf = as_float<Y>(yp + row * D, D, yb);
        if (tok) gf = as_float<M>(gp + b * gate.sb + n * gate.sn, D, gb);
        float* dyo = std::is_same<Y, float>::value ? reinterpret_cast<float*>(dyp + row * D) : u;
        // a per-token fp32 gate gradient is written in place (no staging row)
        constexpr bool direct = std::is_same<M, float>::value;
        float* to = (tok && direct) ? reinterpret_cast<float*>(dgp + row * D) : t;
        gated_bwd_row(of, yf, gf, D, to, dyo);
        if (!std::is_same<Y, float>::value) store_row<Y>(dyp + row * D, u, D);
        if (!tok) accumulate(acc, t, D);
        else if (!direct) store_row<M>(dgp + row * D, t, D);
      }
    }
#ifdef RECTOK_CPU_STREAM
    if (stream) _mm_sfence();
#endif
  });
  if (!tok) sum_partials_any(gpart, B, nchunks, D, dgate);
}

}  // namespace

void adaln_fwd(const at::Tensor& x, const at::Tensor& w, const ModView& sh, const ModView& sc, at::ScalarType mt,
               double eps, at::Tensor& out, at::Tensor& rstd) {
  const float* wp = w.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) cpu_adaln_fwd<float, float>(x, wp, sh, sc, float(eps), out, rstd);
  else if (mt == at::kBFloat16) cpu_adaln_fwd<bf16, bf16>(x, wp, sh, sc, float(eps), out, rstd);
  else cpu_adaln_fwd<bf16, float>(x, wp, sh, sc, float(eps), out, rstd);
}

void adaln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const ModView& sc, at::ScalarType mt,
               const at::Tensor& rstd, bool shift_tok, bool scale_tok, at::Tensor& dx, at::Tensor& dweight,
               at::Tensor& dshift, at::Tensor& dscale) {
  const float* wp = w.data_ptr<float>();
  if (x.scalar_type() == at::kFloat)
    cpu_adaln_bwd<float, float>(dy, x, wp, sc, rstd, shift_tok, scale_tok, dx, dweight, dshift, dscale);
  else if (mt == at::kBFloat16)
    cpu_adaln_bwd<bf16, bf16>(dy, x, wp, sc, rstd, shift_tok, scale_tok, dx, dweight, dshift, dscale);
  else
    cpu_adaln_bwd<bf16, float>(dy, x, wp, sc, rstd, shift_tok, scale_tok, dx, dweight, dshift, dscale);
}

void gated_fwd(const at::Tensor& x, const ModView& gate, at::ScalarType mt, const at::Tensor& y, at::Tensor& out) {
  if (x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat) cpu_gated_fwd<float, float, float>(x, gate, y, out);
  else if (x.scalar_type() == at::kFloat) cpu_gated_fwd<float, bf16, float>(x, gate, y, out);
  else if (mt == at::kBFloat16) cpu_gated_fwd<bf16, bf16, bf16>(x, gate, y, out);
  else cpu_gated_fwd<bf16, bf16, float>(x, gate, y, out);
}

void gated_bwd(const at::Tensor& dout, const ModView& gate, at::ScalarType mt, const at::Tensor& y, at::Tensor& dgate,
               at::Tensor& dy) {
  if (dout.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat)
    cpu_gated_bwd<float, float, float>(dout, gate, y, dgate, dy);
  else if (dout.scalar_type() == at::kFloat) cpu_gated_bwd<float, bf16, float>(dout, gate, y, dgate, dy);
  else if (mt == at::kBFloat16) cpu_gated_bwd<bf16, bf16, bf16>(dout, gate, y, dgate, dy);
  else cpu_gated_bwd<bf16, bf16, float>(dout, gate, y, dgate, dy);
}

}  // namespace cpu
}  // namespace rectok
