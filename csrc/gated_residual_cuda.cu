// CUDA kernels of the gated residual  out = x + gate * y  (fp32 math, result in x's dtype).
// Row mapping and every launch constant: adaln_launch.h.
//
// Forward and the backward with a per-token gate are element-wise: one row per row group, all loads
// of the row (16-byte chunks of x / dout, y and the gate) issued before any arithmetic, many groups
// per SM (small register footprint) so the whole GPU streams. Backward with a per-sample gate: the
// adaln backward's structure without the row reduction -- a block owns rows_per_block tokens of one
// sample, each group prefetches its next row, dgate's column sum stays in registers, one partial row
// per block, finish_kernel adds them in a fixed order. dx = dout needs no kernel (autograd returns it).
#include "adaln_kernels.h"
#include "cuda_utils.cuh"

namespace rectok {
namespace cuda {

template <typename T, typename Y, typename M, bool VEC>
__global__ void __launch_bounds__(launch::kFwdMaxTpr, launch::kFwdMinBlocks)
gated_fwd_kernel(const T* __restrict__ x, const M* __restrict__ gate, int64_t g_sb, int64_t g_sn,
                 const Y* __restrict__ y, T* __restrict__ out, int64_t rows, int64_t N, int D, int tpr) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  constexpr int CPT = launch::kGatedElems / E;
  const RowSlot s(tpr);
  const int64_t row = int64_t(blockIdx.x) * s.groups + s.group;
  if (row >= rows) return;  // no block-wide synchronisation in this kernel
  const int64_t b = row / N, n = row - b * N;
  const M* gr = gate + b * g_sb + n * g_sn;
  Pack<T, E> xv[CPT];
  Pack<Y, E> yv[CPT];
  Pack<M, E> gv[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    xv[k].template load<VEC>(x + row * D + col, D - col);
    yv[k].template load<VEC>(y + row * D + col, D - col);
    gv[k].template load<VEC>(gr + col, D - col);
  }
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    if (col >= D) continue;
    Pack<T, E> o;
#pragma unroll
    for (int j = 0; j < E; ++j) o.set(j, xv[k].get(j) + gv[k].get(j) * yv[k].get(j));
    o.template store<VEC>(out + row * D + col, D - col);
  }
}

// Per-token gate: dy = gate * dout, dgate = dout * y, both per element.
template <typename T, typename Y, typename M, bool VEC>
__global__ void __launch_bounds__(launch::kFwdMaxTpr, launch::kFwdMinBlocks)
gated_bwd_token_kernel(const T* __restrict__ dout, const M* __restrict__ gate, int64_t g_sb, int64_t g_sn,
                       const Y* __restrict__ y, Y* __restrict__ dy, M* __restrict__ dgate, int64_t rows, int64_t N,
                       int D, int tpr) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  constexpr int CPT = launch::kGatedElems / E;
  const RowSlot s(tpr);
  const int64_t row = int64_t(blockIdx.x) * s.groups + s.group;
  if (row >= rows) return;
  const int64_t b = row / N, n = row - b * N;
  const M* gr = gate + b * g_sb + n * g_sn;
  Pack<T, E> ov[CPT];
  Pack<Y, E> yv[CPT];
  Pack<M, E> gv[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    ov[k].template load<VEC>(dout + row * D + col, D - col);
    yv[k].template load<VEC>(y + row * D + col, D - col);
    gv[k].template load<VEC>(gr + col, D - col);
  }
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    if (col >= D) continue;
    Pack<Y, E> dyv;
    Pack<M, E> dg;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float o = ov[k].get(j);
      dyv.set(j, gv[k].get(j) * o);
      dg.set(j, o * yv[k].get(j));
    }
    dyv.template store<VEC>(dy + row * D + col, D - col);
    dg.template store<VEC>(dgate + row * D + col, D - col);
  }
}

// Per-sample gate: dy = gate_b * dout; partial dgate_b = sum over this block's tokens of dout * y.
template <typename T, typename Y, typename M, bool VEC>
__global__ void __launch_bounds__(launch::kMaxTpr, 1)
gated_bwd_sample_kernel(const T* __restrict__ dout, const M* __restrict__ gate, int64_t g_sb,
                        const Y* __restrict__ y, Y* __restrict__ dy, float* __restrict__ pg, int64_t N, int D,
                        int tpr, int64_t rows_per_block, int iters) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  constexpr int CPT = launch::kGatedBwdElems / E;
  __shared__ float buf[(launch::kTargetThreads / 2) * CPT * E];
  const RowSlot s(tpr);
  const int64_t b = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t n_end = n0 + rows_per_block < N ? n0 + rows_per_block : N;

  Pack<M, E> gv[CPT];
  float acc[CPT][E];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int col = s.col<E>(k);
    gv[k].template load<VEC>(gate + b * g_sb + col, D - col);
#pragma unroll
    for (int j = 0; j < E; ++j) acc[k][j] = 0.f;
  }
  Pack<T, E> oc[CPT];
  Pack<Y, E> yc[CPT];
  {
    const int64_t n = n0 + s.group, row = b * N + n;
    const bool active = n < n_end;
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      const int col = s.col<E>(k);
      const int valid = active ? D - col : 0;
      oc[k].template load<VEC>(dout + row * D + col, valid);
      yc[k].template load<VEC>(y + row * D + col, valid);
    }
  }
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    const int64_t n = n0 + s.group + int64_t(it) * s.groups, row = b * N + n;
    const bool active = n < n_end;
    Pack<T, E> on[CPT];
    Pack<Y, E> yn[CPT];
    const int64_t n2 = n + s.groups, row2 = b * N + n2;
    const bool active2 = it + 1 < iters && n2 < n_end;
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      const int col = s.col<E>(k);
      const int valid = active2 ? D - col : 0;
      on[k].template load<VEC>(dout + row2 * D + col, valid);
      yn[k].template load<VEC>(y + row2 * D + col, valid);
    }
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      const int col = s.col<E>(k);
      const int valid = active ? D - col : 0;
      Pack<Y, E> dyv;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        const float o = oc[k].get(j);
        acc[k][j] += o * yc[k].get(j);
        dyv.set(j, gv[k].get(j) * o);
      }
      dyv.template store<VEC>(dy + row * D + col, valid);
    }
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      oc[k] = on[k];
      yc[k] = yn[k];
    }
  }
  sum_over_groups<CPT, E>(acc, s, buf);
  store_partial<CPT, E, VEC>(acc, s, pg + (b * int64_t(gridDim.x) + blockIdx.x) * D, D);
}

namespace {

bool mod_vec_ok(const ModArg& m, int elem_bytes, int E) {
  const int64_t bytes = int64_t(E) * elem_bytes;
  return aligned_to(m.ptr, bytes < 16 ? bytes : 16) && m.sb % E == 0 && m.sn % E == 0;
}

template <typename S>
bool chunk_aligned(const void* p, int E) {
  const int64_t bytes = int64_t(E) * int64_t(sizeof(S));
  return aligned_to(p, bytes < 16 ? bytes : 16);
}

template <typename T, typename Y, typename M>
cudaError_t launch_fwd(const GatedFwdArgs& a, cudaStream_t stream) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  const auto& cfg = a.cfg;
  const bool vec = a.D % E == 0 && aligned_to(a.x, 16) && aligned_to(a.out, 16) && chunk_aligned<Y>(a.y, E) &&
                   mod_vec_ok(a.gate, int(sizeof(M)), E);
  auto kernel = vec ? gated_fwd_kernel<T, Y, M, true> : gated_fwd_kernel<T, Y, M, false>;
  kernel<<<dim3(unsigned(cfg.grid_x)), dim3(unsigned(cfg.threads)), 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const M*>(a.gate.ptr), a.gate.sb, a.gate.sn,
      static_cast<const Y*>(a.y), static_cast<T*>(a.out), a.B * a.N, a.N, int(a.D), cfg.tpr);
  return cudaGetLastError();
}

template <typename T, typename Y, typename M>
cudaError_t launch_bwd(const GatedBwdArgs& a, cudaStream_t stream) {
  constexpr int E = launch::kChunkBytes / int(sizeof(T));
  const bool vec = a.D % E == 0 && aligned_to(a.dout, 16) && chunk_aligned<Y>(a.y, E) &&
                   chunk_aligned<Y>(a.dy, E) && mod_vec_ok(a.gate, int(sizeof(M)), E) &&
                   (!a.gate_tok || chunk_aligned<M>(a.dgate, E));
  if (a.gate_tok) {
    const auto& cfg = a.cfg;
    auto kernel = vec ? gated_bwd_token_kernel<T, Y, M, true> : gated_bwd_token_kernel<T, Y, M, false>;
    kernel<<<dim3(unsigned(cfg.grid_x)), dim3(unsigned(cfg.threads)), 0, stream>>>(
        static_cast<const T*>(a.dout), static_cast<const M*>(a.gate.ptr), a.gate.sb, a.gate.sn,
        static_cast<const Y*>(a.y), static_cast<Y*>(a.dy), static_cast<M*>(a.dgate), a.B * a.N, a.N, int(a.D),
        cfg.tpr);
    return cudaGetLastError();
  }
  const auto& cfg = a.cfg;
  auto kernel = vec ? gated_bwd_sample_kernel<T, Y, M, true> : gated_bwd_sample_kernel<T, Y, M, false>;
  kernel<<<dim3(unsigned(cfg.grid_x), unsigned(cfg.grid_y)), dim3(unsigned(cfg.threads)), 0, stream>>>(
      static_cast<const T*>(a.dout), static_cast<const M*>(a.gate.ptr), a.gate.sb, static_cast<const Y*>(a.y),
      static_cast<Y*>(a.dy), a.pg, a.N, int(a.D), cfg.tpr, cfg.rows_per_block, int(cfg.iters));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned fin_grid = unsigned(launch::ceil_div(a.D, launch::kFinishCols));
  finish_kernel<M><<<fin_grid, launch::kFinishCols * launch::kFinishSlices, 0, stream>>>(
      nullptr, a.pg, cfg.grid_x, a.B, int(a.D), nullptr, 0, nullptr, nullptr, false, nullptr, false, a.dgate,
      a.dgate_bf16);
  return cudaGetLastError();
}

// (T, Y, M) combinations of adaln_kernels.h.
template <template <typename, typename, typename> class F, typename A>
cudaError_t dispatch(const A& a, cudaStream_t stream) {
  if (a.t == DType::F32 && a.y_t == DType::F32) return F<float, float, float>::run(a, stream);
  if (a.t == DType::F32) return F<float, bf16, float>::run(a, stream);
  if (a.m == DType::BF16) return F<bf16, bf16, bf16>::run(a, stream);
  return F<bf16, bf16, float>::run(a, stream);
}

template <typename T, typename Y, typename M>
struct Fwd {
  static cudaError_t run(const GatedFwdArgs& a, cudaStream_t stream) { return launch_fwd<T, Y, M>(a, stream); }
};
template <typename T, typename Y, typename M>
struct Bwd {
  static cudaError_t run(const GatedBwdArgs& a, cudaStream_t stream) { return launch_bwd<T, Y, M>(a, stream); }
};

}  // namespace

cudaError_t gated_fwd(const GatedFwdArgs& a, cudaStream_t stream) {
  if (a.B * a.N == 0) return cudaSuccess;
  return dispatch<Fwd>(a, stream);
}

cudaError_t gated_bwd(const GatedBwdArgs& a, cudaStream_t stream) {
  if (a.B * a.N == 0) return cudaSuccess;
  return dispatch<Bwd>(a, stream);
}

}  // namespace cuda
}  // namespace rectok
