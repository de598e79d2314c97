// rectok_fast._C: the AdaLN extension's binding. Input checks, dtype/device dispatch, and the CPU
// implementation (the CUDA kernels live in adaln_cuda.cu / gated_residual_cuda.cu).
//
// Ops (reference semantics: rectok_fast/ops/reference.py):
//   adaln_fwd(x, weight, shift, scale, eps) -> (out, rstd)
//       out = (round_x.dtype(x * rstd) * weight) * (1 + scale) + shift, rstd = rsqrt(mean(x^2) + eps) (B, N) fp32
//   adaln_bwd(dy, x, weight, shift, scale, rstd) -> (dx, dweight, dshift, dscale)
//   gated_fwd(x, gate, y) -> x + gate * y
//   gated_bwd(dout, gate, y) -> (dgate, dy)                    (dx = dout, returned by the Python side)
// x, y: (B, N, D); weight: (D,); shift/scale/gate: (B, D), (B, 1, D) or (B, N, D), any strides.
// Math in fp32; results in x's dtype; each gradient in the shape and dtype of its input.
// Reductions (row sums, and the sums over tokens / samples for the parameter and per-sample
// modulation gradients) run in a fixed order that depends only on the shapes: results are
// deterministic and independent of the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "adaln.h"

namespace rectok {

namespace {
std::atomic<bool> g_poison{false};
}

bool poison_outputs() { return g_poison.load(); }

at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

namespace {

using bf16 = c10::BFloat16;

// ----------------------------------------------------------------------------------------------
// Checks and input normalisation
// ----------------------------------------------------------------------------------------------

bool supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " must be float32 or bfloat16, got ",
              dtype_name(t.scalar_type()));
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all inputs must be on the same device");
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, D), got a ", x.dim(), "-d tensor of shape ", x.sizes());
  check_dtype(x, op, "x");
  TORCH_CHECK(x.size(2) >= 1, op, ": the feature dimension D must be at least 1, got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), op, ": tensors on ", x.device(),
              " are not supported (cpu or cuda)");
#ifndef RECTOK_FAST_WITH_CUDA
  TORCH_CHECK(!x.device().is_cuda(), op, ": rectok_fast._C was built without CUDA kernels "
              "(RECTOK_FAST_SKIP_CUDA=1, no nvcc, or a CPU-only torch); rebuild it to use CUDA tensors");
#else
  if (x.device().is_cuda()) {
    TORCH_CHECK(x.size(0) <= 65535, op, ": the CUDA kernels support at most 65535 samples per call, got B = ",
                x.size(0));
    TORCH_CHECK(x.size(2) <= cuda_max_dim(x.scalar_type()), op, ": D = ", x.size(2),
                " is larger than the CUDA kernels support for ", dtype_name(x.scalar_type()), " (at most ",
                cuda_max_dim(x.scalar_type()), ": one thread block of ", kCudaMaxThreads, " threads holds a row, ",
                cuda_elems_per_thread(x.scalar_type()), " elements per thread)");
  }
#endif
}

// A modulation tensor as a (B, Nm, D) view with unit inner stride; Nm in {1, N}.
struct Mod {
  at::Tensor view;  // keeps the (possibly upcast / copied) storage alive
  ModView mv;
  at::IntArrayRef orig_sizes;
  at::ScalarType orig_dtype;
};

// need_data = false: only the shape is used (shift in the backward), so no upcast / copy is made.
Mod prep_mod(const at::Tensor& m, const at::Tensor& x, at::ScalarType mtype, const char* op, const char* name,
             bool need_data = true) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_dtype(m, op, name);
  check_device(m, x, op, name);
  const bool ok2 = m.dim() == 2 && m.size(0) == B && m.size(1) == D;
  const bool ok3 = m.dim() == 3 && m.size(0) == B && m.size(2) == D && (m.size(1) == 1 || m.size(1) == N);
  TORCH_CHECK(ok2 || ok3, op, ": ", name, " must be (B, D), (B, 1, D) or (B, N, D) for x of shape ", x.sizes(),
              "; got ", m.sizes());
  Mod r;
  r.orig_sizes = m.sizes();
  r.orig_dtype = m.scalar_type();
  at::Tensor v = m.dim() == 2 ? m.unsqueeze(1) : m;
  if (need_data && v.scalar_type() != mtype) v = v.to(mtype);  // only exact upcasts (bf16 -> fp32) happen here
  if (need_data && D > 1 && v.stride(2) != 1) v = v.contiguous();  // only the inner dim needs unit stride
  r.view = v;
  r.mv.ptr = v.data_ptr();
  r.mv.sb = B > 1 ? v.stride(0) : 0;
  r.mv.sn = v.size(1) > 1 ? v.stride(1) : 0;
  r.mv.per_token = v.size(1) == N;
  return r;
}

// A gradient computed as a contiguous (B, Nm, D) tensor of the compute dtype, returned in the
// input's shape and dtype.
at::Tensor finish_mod_grad(const at::Tensor& g, const Mod& m) {
  at::Tensor r = g.scalar_type() == m.orig_dtype ? g : g.to(m.orig_dtype);
  return r.view(m.orig_sizes);
}

// ----------------------------------------------------------------------------------------------
// CPU implementation
// ----------------------------------------------------------------------------------------------

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

// dx = rstd * (g - xhat * mean(g * xhat))
RECTOK_CPU_CLONES void adaln_dx_row(const float* __restrict__ g, const float* __restrict__ xh, float r, float m, int64_t D,
                         float* __restrict__ o) {
  for (int64_t d = 0; d < D; ++d) o[d] = r * (g[d] - xh[d] * m);
}

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
    std::vector<float> buf(4 * D);
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
  const int64_t R = bwd_rows_per_block(N), nchunks = (N + R - 1) / R;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor wpart = new_buffer({B * nchunks, D}, f32);
  at::Tensor shpart = shift_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  at::Tensor scpart = scale_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  const T* xp = x.data_ptr<T>();
  const T* gp = dy.data_ptr<T>();
  const float* rp = rstd.data_ptr<float>();
  const M* scp = static_cast<const M*>(sc.ptr);
  T* dxp = dx.data_ptr<T>();
  M* dshp = shift_tok ? dshift.data_ptr<M>() : nullptr;
  M* dscp = scale_tok ? dscale.data_ptr<M>() : nullptr;
  float* wpp = wpart.data_ptr<float>();
  float* shpp = shift_tok ? nullptr : shpart.data_ptr<float>();
  float* scpp = scale_tok ? nullptr : scpart.data_ptr<float>();

  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(7 * D);
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
        if (shift_tok) store_row<M>(dshp + row * D, gy, D);
        else accumulate(ash, gy, D);
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
  at::parallel_for(0, B * N, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * D);
    float *xb = buf.data(), *yb = xb + D, *gb = yb + D, *ob = gb + D;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row - b * N;
      const float* xf = as_float<T>(xp + row * D, D, xb);
      const float* yf = as_float<Y>(yp + row * D, D, yb);
      const float* gf = as_float<M>(gp + b * gate.sb + n * gate.sn, D, gb);
      float* o = std::is_same<T, float>::value ? reinterpret_cast<float*>(op + row * D) : ob;
      gated_fwd_row(xf, gf, yf, D, o);
      if (!std::is_same<T, float>::value) store_row<T>(op + row * D, ob, D);
    }
  });
}

template <typename T, typename Y, typename M>
void cpu_gated_bwd(const at::Tensor& dout, const ModView& gate, const at::Tensor& y, at::Tensor& dgate,
                   at::Tensor& dy) {
  const int64_t B = dout.size(0), N = dout.size(1), D = dout.size(2);
  const int64_t R = bwd_rows_per_block(N), nchunks = (N + R - 1) / R;
  const bool tok = gate.per_token;
  at::Tensor gpart = tok ? at::Tensor() : new_buffer({B * nchunks, D}, dout.options().dtype(at::kFloat));
  const T* op = dout.data_ptr<T>();
  const Y* yp = y.data_ptr<Y>();
  const M* gp = static_cast<const M*>(gate.ptr);
  Y* dyp = dy.data_ptr<Y>();
  M* dgp = tok ? dgate.data_ptr<M>() : nullptr;
  float* gpp = tok ? nullptr : gpart.data_ptr<float>();
  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(5 * D);
    float *ob = buf.data(), *yb = ob + D, *gb = yb + D, *t = gb + D, *u = t + D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunks, c = task - b * nchunks;
      const int64_t n0 = c * R, n1 = std::min(N, n0 + R);
      float* acc = tok ? nullptr : gpp + task * D;
      if (acc) std::fill(acc, acc + D, 0.f);
      const float* gf = tok ? nullptr : as_float<M>(gp + b * gate.sb, D, gb);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        const float* of = as_float<T>(op + row * D, D, ob);
        const float* yf = as_float<Y>(yp + row * D, D, yb);
        if (tok) gf = as_float<M>(gp + b * gate.sb + n * gate.sn, D, gb);
        float* dyo = std::is_same<Y, float>::value ? reinterpret_cast<float*>(dyp + row * D) : u;
        gated_bwd_row(of, yf, gf, D, t, dyo);
        if (!std::is_same<Y, float>::value) store_row<Y>(dyp + row * D, u, D);
        if (tok) store_row<M>(dgp + row * D, t, D);
        else accumulate(acc, t, D);
      }
    }
  });
  if (!tok) sum_partials_any(gpart, B, nchunks, D, dgate);
}

// ----------------------------------------------------------------------------------------------
// Ops
// ----------------------------------------------------------------------------------------------

at::ScalarType mod_type_for(at::ScalarType xt, const at::Tensor& a, const at::Tensor& b) {
  if (xt == at::kFloat) return at::kFloat;
  return (a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16) ? at::kBFloat16 : at::kFloat;
}

at::Tensor prep_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  check_dtype(weight, op, "weight");
  check_device(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(2), op, ": weight must be (", x.size(2),
              ",) for x of shape ", x.sizes(), "; got ", weight.sizes());
  return weight.to(at::kFloat).contiguous();
}

std::vector<at::Tensor> adaln_fwd(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& shift,
                                  const at::Tensor& scale, double eps) {
  const char* op = "rectok_fast adaln_modulate";
  check_x(x_in, op);
  const at::Tensor w = prep_weight(weight, x_in, op);
  const auto mt = mod_type_for(x_in.scalar_type(), shift, scale);
  const Mod sh = prep_mod(shift, x_in, mt, op, "shift");
  const Mod sc = prep_mod(scale, x_in, mt, op, "scale");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = new_buffer(x.sizes(), x.options());
  at::Tensor rstd = new_buffer({B, N}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, rstd};
  if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    cuda::adaln_fwd(x, w, sh.mv, sc.mv, mt, eps, out, rstd);
#endif
  } else if (x.scalar_type() == at::kFloat) {
    cpu_adaln_fwd<float, float>(x, w.data_ptr<float>(), sh.mv, sc.mv, float(eps), out, rstd);
  } else if (mt == at::kBFloat16) {
    cpu_adaln_fwd<bf16, bf16>(x, w.data_ptr<float>(), sh.mv, sc.mv, float(eps), out, rstd);
  } else {
    cpu_adaln_fwd<bf16, float>(x, w.data_ptr<float>(), sh.mv, sc.mv, float(eps), out, rstd);
  }
  return {out, rstd};
}

std::vector<at::Tensor> adaln_bwd(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight,
                                  const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& rstd_in) {
  const char* op = "rectok_fast adaln_modulate backward";
  check_x(x_in, op);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": the output gradient must match x (", x_in.sizes(), ", ", dtype_name(x_in.scalar_type()), "), got ",
              dy_in.sizes(), ", ", dtype_name(dy_in.scalar_type()));
  check_device(dy_in, x_in, op, "the output gradient");
  check_device(rstd_in, x_in, op, "rstd");
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.dim() == 2 && rstd_in.size(0) == x_in.size(0) &&
              rstd_in.size(1) == x_in.size(1), op, ": rstd must be float32 (B, N), got ", rstd_in.sizes(), " ",
              dtype_name(rstd_in.scalar_type()));
  const at::Tensor w = prep_weight(weight, x_in, op);
  const auto mt = mod_type_for(x_in.scalar_type(), shift, scale);
  const Mod sh = prep_mod(shift, x_in, mt, op, "shift", /*need_data=*/false);
  const Mod sc = prep_mod(scale, x_in, mt, op, "scale");
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const auto mopt = x.options().dtype(mt);
  at::Tensor dx = new_buffer(x.sizes(), x.options());
  at::Tensor dweight = new_buffer({D}, x.options().dtype(at::kFloat));
  at::Tensor dshift = new_buffer({B, sh.mv.per_token ? N : 1, D}, mopt);
  at::Tensor dscale = new_buffer({B, sc.mv.per_token ? N : 1, D}, mopt);
  if (x.numel() == 0) {
    dweight.zero_();
    dshift.zero_();
    dscale.zero_();
  } else if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    cuda::adaln_bwd(dy, x, w, sc.mv, mt, rstd, sh.mv.per_token, sc.mv.per_token, dx, dweight, dshift, dscale);
#endif
  } else if (x.scalar_type() == at::kFloat) {
    cpu_adaln_bwd<float, float>(dy, x, w.data_ptr<float>(), sc.mv, rstd, sh.mv.per_token, sc.mv.per_token, dx,
                                dweight, dshift, dscale);
  } else if (mt == at::kBFloat16) {
    cpu_adaln_bwd<bf16, bf16>(dy, x, w.data_ptr<float>(), sc.mv, rstd, sh.mv.per_token, sc.mv.per_token, dx,
                              dweight, dshift, dscale);
  } else {
    cpu_adaln_bwd<bf16, float>(dy, x, w.data_ptr<float>(), sc.mv, rstd, sh.mv.per_token, sc.mv.per_token, dx,
                               dweight, dshift, dscale);
  }
  return {dx, dweight.to(weight.scalar_type()), finish_mod_grad(dshift, sh), finish_mod_grad(dscale, sc)};
}

// Gated residual: y must have x's shape; (T, Y) = (bf16, f32) is computed in fp32 and rounded once.
void check_gated(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_x(x, op);
  check_dtype(y, op, "y");
  check_device(y, x, op, "y");
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": x ", x.sizes(), " and y ", y.sizes(), " must both be (B, N, D)");
}

at::Tensor gated_fwd(const at::Tensor& x_in, const at::Tensor& gate, const at::Tensor& y_in) {
  const char* op = "rectok_fast gated_residual";
  check_gated(x_in, y_in, op);
  const auto out_dtype = x_in.scalar_type();
  // x bf16 with y fp32: compute in fp32 (exact upcast of x), round the result once, as the reference does.
  const bool up = out_dtype == at::kBFloat16 && y_in.scalar_type() == at::kFloat;
  const at::Tensor x = (up ? x_in.to(at::kFloat) : x_in).contiguous();
  const at::Tensor y = y_in.contiguous();
  const auto mt = mod_type_for(x.scalar_type(), gate, gate);
  const Mod g = prep_mod(gate, x, mt, op, "gate");
  at::Tensor out = new_buffer(x.sizes(), x.options());
  if (x.numel() == 0) return up ? out.to(out_dtype) : out;
  if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    cuda::gated_fwd(x, g.mv, mt, y, out);
#endif
  } else if (x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat) {
    cpu_gated_fwd<float, float, float>(x, g.mv, y, out);
  } else if (x.scalar_type() == at::kFloat) {
    cpu_gated_fwd<float, bf16, float>(x, g.mv, y, out);
  } else if (mt == at::kBFloat16) {
    cpu_gated_fwd<bf16, bf16, bf16>(x, g.mv, y, out);
  } else {
    cpu_gated_fwd<bf16, bf16, float>(x, g.mv, y, out);
  }
  return up ? out.to(out_dtype) : out;
}

std::vector<at::Tensor> gated_bwd(const at::Tensor& dout_in, const at::Tensor& gate, const at::Tensor& y_in) {
  const char* op = "rectok_fast gated_residual backward";
  check_gated(dout_in, y_in, op);
  const bool up = dout_in.scalar_type() == at::kBFloat16 && y_in.scalar_type() == at::kFloat;
  const at::Tensor dout = (up ? dout_in.to(at::kFloat) : dout_in).contiguous();
  const at::Tensor y = y_in.contiguous();
  const auto mt = mod_type_for(dout.scalar_type(), gate, gate);
  const Mod g = prep_mod(gate, dout, mt, op, "gate");
  const int64_t B = dout.size(0), N = dout.size(1), D = dout.size(2);
  at::Tensor dgate = new_buffer({B, g.mv.per_token ? N : 1, D}, dout.options().dtype(mt));
  at::Tensor dy = new_buffer(y.sizes(), y.options());
  if (dout.numel() == 0) {
    dgate.zero_();
  } else if (dout.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    cuda::gated_bwd(dout, g.mv, mt, y, dgate, dy);
#endif
  } else if (dout.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat) {
    cpu_gated_bwd<float, float, float>(dout, g.mv, y, dgate, dy);
  } else if (dout.scalar_type() == at::kFloat) {
    cpu_gated_bwd<float, bf16, float>(dout, g.mv, y, dgate, dy);
  } else if (mt == at::kBFloat16) {
    cpu_gated_bwd<bf16, bf16, bf16>(dout, g.mv, y, dgate, dy);
  } else {
    cpu_gated_bwd<bf16, bf16, float>(dout, g.mv, y, dgate, dy);
  }
  return {finish_mod_grad(dgate, g), dy};
}

bool has_cuda() {
#ifdef RECTOK_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Launch configuration the CUDA kernels would use for rows of width D (host-only; raises for an
// unsupported D). Lets CPU-only CI check the limits and their error message.
std::vector<int64_t> cuda_launch_config(int64_t D, const std::string& dtype) {
  TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "cuda_launch_config: dtype must be 'float32' or "
              "'bfloat16', got '", dtype, "'");
  const auto t = dtype == "float32" ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(D >= 1 && D <= cuda_max_dim(t), "rectok_fast adaln (CUDA): D = ", D,
              " is larger than the CUDA kernels support for ", dtype, " (at most ", cuda_max_dim(t),
              ": one thread block of ", kCudaMaxThreads, " threads holds a row, ", cuda_elems_per_thread(t),
              " elements per thread)");
  return {cuda_threads_for(D, t), cuda_elems_per_thread(t), cuda_max_dim(t)};
}

}  // namespace
}  // namespace rectok

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rectok_fast AdaLN extension: modulated RMSNorm and gated residual (CPU + CUDA)";
  m.def("adaln_fwd", &rectok::adaln_fwd, "modulated RMSNorm forward -> (out, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("shift"), py::arg("scale"), py::arg("eps"));
  m.def("adaln_bwd", &rectok::adaln_bwd, "modulated RMSNorm backward -> (dx, dweight, dshift, dscale)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("shift"), py::arg("scale"), py::arg("rstd"));
  m.def("gated_fwd", &rectok::gated_fwd, "gated residual x + gate * y", py::arg("x"), py::arg("gate"),
        py::arg("y"));
  m.def("gated_bwd", &rectok::gated_bwd, "gated residual backward -> (dgate, dy)", py::arg("dout"),
        py::arg("gate"), py::arg("y"));
  m.def("has_cuda", &rectok::has_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_launch_config", &rectok::cuda_launch_config,
        "(threads per block, elements per thread, max D) of the CUDA kernels; raises for unsupported D",
        py::arg("D"), py::arg("dtype"));
  m.def("set_poison_outputs", [](bool on) { rectok::g_poison.store(on); },
        "test hook: allocate every output and scratch buffer pre-filled with NaN");
  m.def("poison_outputs", &rectok::poison_outputs);
}
