// CUDA kernels of the modulated RMSNorm (fp32 math):
//   out = round_T(x * rstd) * weight * (1 + scale) + shift,   rstd = rsqrt(mean(x^2) + eps)
// Row mapping and every launch constant: adaln_launch.h.
//
// Forward: one row per row group, several groups per block. Each thread issues the loads of all its
// chunks of x AND of shift/scale before the row reduction, so the modulation's latency hides behind
// x's instead of following the reduction; the weight (one row for the whole grid, L1/L2-resident)
// is read after it.
//
// Backward: a block owns rows_per_block tokens of one sample; each row group walks its rows with a
// register ring of prefetch_rows() rows (x, dy, rstd, and a per-token scale) requested ahead of the row it
// computes. Template flags pick the per-sample / per-token modulation variant, so neither carries the
// other's registers. Column sums
// stay in registers: per-sample scale -> S1 = sum dy * xr (dweight = sum_b (1 + scale_b) S1_b, dscale_b
// = w S1_b), per-token scale -> A = sum dy (1 + scale) xr; per-sample shift -> S0 = sum dy. The groups
// of a block are summed in group order in shared memory, one fp32 partial row per block, and
// finish_kernel (cuda_utils.cuh) adds the partials spread over D/32 x 1024-thread blocks.
// Per-token dshift is dy itself: nothing is written for it.
#include "adaln_kernels.h"
#include "cuda_utils.cuh"

namespace rectok {
namespace cuda {

template <typename T, typename M, bool VEC>
__global__ void __launch_bounds__(launch::kFwdMaxTpr, launch::kFwdMinBlocks)
adaln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, const M* __restrict__ shift, int64_t sh_sb,
                 int64_t sh_sn, const M* __restrict__ scale, int64_t sc_sb, int64_t sc_sn, T* __restrict__ out,
                 float* __restrict__ rstd, int64_t rows, int64_t N, int D, int tpr, float eps) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  constexpr int CPT = launch::kAdalnFwdElems / E;
  __shared__ float red[launch::kMaxTpr / launch::kWarp];
  const RowSlot s(tpr);
  const int64_t row = int64_t(blockIdx.x) * s.groups + s.group;
  const bool active = row < rows;  // inactive groups still take part in the block-wide reduction
  const int64_t rr = active ? row : 0;
  const int64_t b = rr / N, n = rr - b * N;
  const T* xr = x + rr * D;
  const M* shr = shift + b * sh_sb + n * sh_sn;
  const M* scr = scale + b * sc_sb + n * sc_sn;

  Pack<T, E> xv[CPT];
  Pack<M, E> sh[CPT], sc[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    const int valid = active ? D - col : 0;
    xv[k].template load<VEC>(xr + col, valid);
    sh[k].template load<VEC>(shr + col, valid);
    sc[k].template load<VEC>(scr + col, valid);
  }
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < CPT; ++k)
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float v = xv[k].get(j);
      ss += v * v;
    }
  ss = group_sum(ss, tpr, red);
  const float r = rsqrtf(ss / float(D) + eps);
  if (active && s.lane == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    const int valid = active ? D - col : 0;
    if (valid <= 0) continue;
    Pack<float, E> wv;
    wv.template load<VEC>(w + col, valid);
    Pack<T, E> o;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float a = round_through<T>(xv[k].get(j) * r) * wv.get(j);
      o.set(j, a * (1.f + sc[k].get(j)) + sh[k].get(j));
    }
    o.template store<VEC>(out + rr * D + col, valid);
  }
}

// One backward row of this thread: x, dy, the per-token scale and rstd (zeros when inactive).
template <typename T, typename M, int CPT, int E, bool VEC>
__device__ __forceinline__ void load_bwd_row(Pack<T, E> (&xv)[CPT], Pack<T, E> (&gv)[CPT], Pack<M, E> (&sv)[CPT],
                                             float& r, const T* __restrict__ x, const T* __restrict__ dy,
                                             const M* __restrict__ scale_row, bool scale_tok,
                                             const float* __restrict__ rstd, int64_t row, bool active, int D,
                                             const RowSlot& s) {
  r = active ? rstd[row] : 0.f;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    const int valid = active ? D - col : 0;
    xv[k].template load<VEC>(x + row * D + col, valid);
    gv[k].template load<VEC>(dy + row * D + col, valid);
    if (scale_tok) sv[k].template load<VEC>(scale_row + col, valid);
    else sv[k].zero();
  }
}

template <typename T, typename M, bool VEC, bool SCALE_TOK, bool SHIFT_TOK>
__global__ void __launch_bounds__(launch::kMaxTpr)
adaln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                 const M* __restrict__ scale, int64_t sc_sb, int64_t sc_sn, const float* __restrict__ rstd,
                 T* __restrict__ dx, M* __restrict__ dscale_tok, float* __restrict__ pw, float* __restrict__ ps,
                 int64_t N, int D, int tpr, int64_t rows_per_block, int iters) {
  // Template flags: the per-sample-scale variant keeps no scale ring, the per-token-shift one no dshift sum.
  constexpr bool scale_tok = SCALE_TOK, shift_tok = SHIFT_TOK;
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  constexpr int CPT = launch::kAdalnBwdElems / E;
  __shared__ float red[launch::kMaxTpr / launch::kWarp];
  // Cross-group sums exist only with >= 2 groups, i.e. tpr <= kTargetThreads / 2.
  __shared__ float buf[(launch::kTargetThreads / 2) * CPT * E];
  const RowSlot s(tpr);
  const int64_t b = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t n_end = n0 + rows_per_block < N ? n0 + rows_per_block : N;
  const float inv_d = 1.f / float(D);

  Pack<float, E> wv[CPT];
  Pack<M, E> scs[CPT];  // per-sample scale
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    wv[k].template load<VEC>(w + col, D - col);
    if (!scale_tok) scs[k].template load<VEC>(scale + b * sc_sb + col, D - col);
    else scs[k].zero();
  }
  float acc1[CPT][E], acc0[CPT][E];
#pragma unroll
  for (int k = 0; k < CPT; ++k)
#pragma unroll
    for (int j = 0; j < E; ++j) acc1[k][j] = acc0[k][j] = 0.f;

  // Ring of P rows per thread: row it + P is requested before row it is computed, so P rows of x / dy
  // (and a per-token scale) are in flight per group at any time.
  constexpr int P = launch::prefetch_rows(SCALE_TOK, int(sizeof(T)));
  Pack<T, E> xq[P][CPT], gq[P][CPT];
  Pack<M, E> sq[P][CPT];
  float rq[P];
  auto row_of = [&](int it) { return n0 + s.group + int64_t(it) * s.groups; };
#pragma unroll
  for (int q = 0; q < P; ++q) {
    const int64_t n = row_of(q);
    load_bwd_row<T, M, CPT, E, VEC>(xq[q], gq[q], sq[q], rq[q], x, dy, scale + b * sc_sb + n * sc_sn, scale_tok,
                                    rstd, b * N + n, q < iters && n < n_end, D, s);
  }
#pragma unroll 1
  for (int base = 0; base < iters; base += P) {
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const int it = base + q;
      if (it >= iters) break;  // uniform over the block: the group sums below stay matched
      const int64_t n = row_of(it);
      const bool active = n < n_end;
      const int64_t row = b * N + n;
      Pack<T, E> xc[CPT], gc[CPT];
      Pack<M, E> sc[CPT];
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        xc[k] = xq[q][k];
        gc[k] = gq[q][k];
        sc[k] = sq[q][k];
      }
      const float rc = rq[q];
      {
        const int64_t n2 = row_of(it + P);
        load_bwd_row<T, M, CPT, E, VEC>(xq[q], gq[q], sq[q], rq[q], x, dy, scale + b * sc_sb + n2 * sc_sn,
                                        scale_tok, rstd, b * N + n2, it + P < iters && n2 < n_end, D, s);
      }

      float dot = 0.f;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        Pack<M, E> dsc;
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const float g = gc[k].get(j), wj = wv[k].get(j);
          const float xh = xc[k].get(j) * rc;
          const float xr = round_through<T>(xh);
          const float sv = scale_tok ? sc[k].get(j) : scs[k].get(j);
          const float gs = g * (1.f + sv);  // d out / d (xr * w)
          acc1[k][j] += (scale_tok ? gs : g) * xr;
          if (!shift_tok) acc0[k][j] += g;
          dot += gs * wj * xh;
          dsc.set(j, g * xr * wj);
        }
        if (scale_tok) {
          const int col = s.col<E>(k);
          dsc.template store<VEC>(dscale_tok + row * D + col, active ? D - col : 0);
        }
      }
      const float m = group_sum(dot, tpr, red) * inv_d;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        const int col = s.col<E>(k);
        const int valid = active ? D - col : 0;
        if (valid <= 0) continue;
        Pack<T, E> o;
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const float xh = xc[k].get(j) * rc;
          const float sv = scale_tok ? sc[k].get(j) : scs[k].get(j);
          const float gw = gc[k].get(j) * (1.f + sv) * wv[k].get(j);  // d out / d xhat
          o.set(j, rc * (gw - xh * m));
        }
        o.template store<VEC>(dx + row * D + col, valid);
      }
    }
  }

  const int64_t prow = b * int64_t(gridDim.x) + blockIdx.x;
  sum_over_groups<CPT, E>(acc1, s, buf);
  store_partial<CPT, E, VEC>(acc1, s, pw + prow * D, D);
  if (!shift_tok) {
    sum_over_groups<CPT, E>(acc0, s, buf);
    store_partial<CPT, E, VEC>(acc0, s, ps + prow * D, D);
  }
}

namespace {

bool mod_vec_ok(const ModArg& m, int elem_bytes, int E) {
  const int64_t bytes = int64_t(E) * elem_bytes;
  return aligned_to(m.ptr, bytes < 16 ? bytes : 16) && m.sb % E == 0 && m.sn % E == 0;
}

template <typename T, typename M>
cudaError_t launch_fwd(const AdalnFwdArgs& a, cudaStream_t stream) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  const auto& cfg = a.cfg;
  const bool vec = a.D % E == 0 && aligned_to(a.x, 16) && aligned_to(a.out, 16) && aligned_to(a.w, 16) &&
                   mod_vec_ok(a.shift, int(sizeof(M)), E) && mod_vec_ok(a.scale, int(sizeof(M)), E);
  auto kernel = vec ? adaln_fwd_kernel<T, M, true> : adaln_fwd_kernel<T, M, false>;
  kernel<<<dim3(unsigned(cfg.grid_x)), dim3(unsigned(cfg.threads)), 0, stream>>>(
      static_cast<const T*>(a.x), a.w, static_cast<const M*>(a.shift.ptr), a.shift.sb, a.shift.sn,
      static_cast<const M*>(a.scale.ptr), a.scale.sb, a.scale.sn, static_cast<T*>(a.out), a.rstd, a.B * a.N, a.N,
      int(a.D), cfg.tpr, a.eps);
  return cudaGetLastError();
}

template <typename T, typename M, bool VEC>
auto pick_bwd_kernel(bool scale_tok, bool shift_tok) {
  // A per-token scale with a per-sample shift is summed by the binding (adaln_kernels.h): no variant for it.
  return scale_tok ? adaln_bwd_kernel<T, M, VEC, true, true>
                   : (shift_tok ? adaln_bwd_kernel<T, M, VEC, false, true> : adaln_bwd_kernel<T, M, VEC, false, false>);
}

template <typename T, typename M>
auto pick_bwd_kernel(bool vec, bool scale_tok, bool shift_tok) {
  return vec ? pick_bwd_kernel<T, M, true>(scale_tok, shift_tok) : pick_bwd_kernel<T, M, false>(scale_tok, shift_tok);
}

template <typename T, typename M>
cudaError_t launch_bwd(const AdalnBwdArgs& a, cudaStream_t stream) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  const auto& cfg = a.cfg;
  const int64_t mbytes = int64_t(E) * int64_t(sizeof(M));
  const bool vec = a.D % E == 0 && aligned_to(a.x, 16) && aligned_to(a.dy, 16) && aligned_to(a.dx, 16) &&
                   aligned_to(a.w, 16) && mod_vec_ok(a.scale, int(sizeof(M)), E) &&
                   (!a.scale_tok || aligned_to(a.dscale, mbytes < 16 ? mbytes : 16));
  auto kernel = pick_bwd_kernel<T, M>(vec, a.scale_tok, a.shift_tok);
  kernel<<<dim3(unsigned(cfg.grid_x), unsigned(cfg.grid_y)), dim3(unsigned(cfg.threads)), 0, stream>>>(
      static_cast<const T*>(a.dy), static_cast<const T*>(a.x), a.w, static_cast<const M*>(a.scale.ptr), a.scale.sb,
      a.scale.sn, a.rstd, static_cast<T*>(a.dx), a.scale_tok ? static_cast<M*>(a.dscale) : nullptr, a.pw,
      a.shift_tok ? nullptr : a.ps, a.N, int(a.D), cfg.tpr, cfg.rows_per_block,
      int(cfg.iters));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned fin_grid = unsigned(launch::ceil_div(a.D, launch::kFinishCols));
  finish_kernel<M><<<fin_grid, launch::kFinishCols * launch::kFinishSlices, 0, stream>>>(
      a.pw, a.shift_tok ? nullptr : a.ps, cfg.grid_x, a.B, int(a.D),
      a.scale_tok ? nullptr : static_cast<const M*>(a.scale.ptr), a.scale.sb, a.w, a.dweight, a.dweight_bf16,
      a.scale_tok ? nullptr : a.dscale, a.dscale_bf16, a.shift_tok ? nullptr : a.dshift, a.dshift_bf16);
  return cudaGetLastError();
}

}  // namespace

cudaError_t adaln_fwd(const AdalnFwdArgs& a, cudaStream_t stream) {
  if (a.B * a.N == 0) return cudaSuccess;
  if (a.t == DType::F32) return launch_fwd<float, float>(a, stream);
  if (a.m == DType::BF16) return launch_fwd<bf16, bf16>(a, stream);
  return launch_fwd<bf16, float>(a, stream);
}

cudaError_t adaln_bwd(const AdalnBwdArgs& a, cudaStream_t stream) {
  if (a.B * a.N == 0) return cudaSuccess;  // the binding zero-fills the column sums of empty inputs
  if (a.t == DType::F32) return launch_bwd<float, float>(a, stream);
  if (a.m == DType::BF16) return launch_bwd<bf16, bf16>(a, stream);
  return launch_bwd<bf16, float>(a, stream);
}

}  // namespace cuda
}  // namespace rectok
