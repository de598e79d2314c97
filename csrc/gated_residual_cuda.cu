// CUDA kernels of the gated residual  out = x + gate * y  (fp32 math, result in x's dtype).
//
// Same row design as adaln_cuda.cu: one block per row, P = 8 elements per thread, the
// gate read through its batch/token strides. Backward: dx = dout is returned by the Python side
// without a kernel; this file computes dy = gate * dout and dgate = sum over tokens of dout * y
// (per-sample gate: per-block fp32 partials summed in index order by a second kernel; deterministic).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "adaln.h"
#include "cuda_utils.cuh"

namespace rectok {
namespace cuda {

using bf16 = c10::BFloat16;

template <typename T, typename Y, typename M, int P, bool VEC>
__global__ void __launch_bounds__(kCudaMaxThreads)
gated_fwd_kernel(const T* __restrict__ x, const M* __restrict__ gate, int64_t g_sb, int64_t g_sn,
                 const Y* __restrict__ y, T* __restrict__ out, int64_t N, int D) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row - b * N;
  float xv[P], yv[P], gv[P];
  load_row<T, P, VEC>(x + row * D, D, xv);
  load_row<Y, P, VEC>(y + row * D, D, yv);
  load_row<M, P, VEC>(gate + b * g_sb + n * g_sn, D, gv);
#pragma unroll
  for (int j = 0; j < P; ++j) xv[j] = xv[j] + gv[j] * yv[j];
  store_row<T, P, VEC>(out + row * D, D, xv);
}

template <typename T, typename Y, typename M, int P, bool VEC>
__global__ void __launch_bounds__(kCudaMaxThreads)
gated_bwd_kernel(const T* __restrict__ dout, const M* __restrict__ gate, int64_t g_sb, int64_t g_sn,
                 const Y* __restrict__ y, Y* __restrict__ dy, M* __restrict__ dgate, bool gate_tok,
                 float* __restrict__ gpart, int64_t N, int D, int64_t rows_per_block) {
  const int64_t c = blockIdx.x, b = blockIdx.y, nchunks = gridDim.x;
  const int64_t n0 = c * rows_per_block;
  const int64_t n1 = n0 + rows_per_block < N ? n0 + rows_per_block : N;
  float gv[P], acc[P];
  if (!gate_tok) load_row<M, P, VEC>(gate + b * g_sb, D, gv);
#pragma unroll
  for (int j = 0; j < P; ++j) acc[j] = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = b * N + n;
    float go[P], yv[P], t[P];
    load_row<T, P, VEC>(dout + row * D, D, go);
    load_row<Y, P, VEC>(y + row * D, D, yv);
    if (gate_tok) load_row<M, P, VEC>(gate + b * g_sb + n * g_sn, D, gv);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      t[j] = go[j] * yv[j];
      acc[j] += t[j];
      yv[j] = gv[j] * go[j];
    }
    store_row<Y, P, VEC>(dy + row * D, D, yv);
    if (gate_tok) store_row<M, P, VEC>(dgate + row * D, D, t);
  }
  if (!gate_tok) store_row<float, P, VEC>(gpart + (b * nchunks + c) * D, D, acc);
}

namespace {

bool vec_ok(const void* p, int64_t elem_size, int P, int64_t sb, int64_t sn) {
  const int64_t bytes = std::min<int64_t>(16, int64_t(P) * elem_size);
  return aligned_to(p, bytes) && sb % P == 0 && sn % P == 0;
}

template <typename T, typename Y, typename M, int P>
void launch_fwd(bool vec, const at::Tensor& x, const ModView& gate, const at::Tensor& y, at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1);
  const int D = int(x.size(2));
  const dim3 grid(unsigned(B * N)), block(cuda_threads_for(D, x.scalar_type()));
  auto k = vec ? gated_fwd_kernel<T, Y, M, P, true> : gated_fwd_kernel<T, Y, M, P, false>;
  k<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(x.data_ptr<T>(), static_cast<const M*>(gate.ptr), gate.sb,
                                                          gate.sn, y.data_ptr<Y>(), out.data_ptr<T>(), N, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Y, typename M, int P>
void launch_bwd(bool vec, const at::Tensor& dout, const ModView& gate, const at::Tensor& y, at::Tensor& dgate,
                at::Tensor& dy) {
  const int64_t B = dout.size(0), N = dout.size(1), D = dout.size(2);
  const int64_t R = bwd_rows_per_block(N);
  const int64_t nchunks = (N + R - 1) / R;
  const bool tok = gate.per_token;
  at::Tensor gpart = tok ? at::Tensor() : new_buffer({B * nchunks, D}, dout.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(B)), block(cuda_threads_for(D, dout.scalar_type()));
  auto k = vec ? gated_bwd_kernel<T, Y, M, P, true> : gated_bwd_kernel<T, Y, M, P, false>;
  k<<<grid, block, 0, stream>>>(dout.data_ptr<T>(), static_cast<const M*>(gate.ptr), gate.sb, gate.sn,
                                y.data_ptr<Y>(), dy.data_ptr<Y>(), tok ? dgate.data_ptr<M>() : nullptr, tok,
                                tok ? nullptr : gpart.data_ptr<float>(), N, int(D), R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!tok) sum_partials(gpart, B, nchunks, D, dgate, stream);
}

// (T, Y, M) combinations listed in adaln.h.
template <template <typename, typename, typename, int> class F, typename... Args>
void dispatch(at::ScalarType t, at::ScalarType yt, at::ScalarType mt, Args&&... args) {
  if (t == at::kFloat && yt == at::kFloat) {
    F<float, float, float, 8>::run(std::forward<Args>(args)...);
  } else if (t == at::kFloat) {
    F<float, bf16, float, 8>::run(std::forward<Args>(args)...);
  } else if (mt == at::kBFloat16) {
    F<bf16, bf16, bf16, 8>::run(std::forward<Args>(args)...);
  } else {
    F<bf16, bf16, float, 8>::run(std::forward<Args>(args)...);
  }
}

template <typename T, typename Y, typename M, int P>
struct Fwd {
  static void run(bool vec, const at::Tensor& x, const ModView& gate, const at::Tensor& y, at::Tensor& out) {
    launch_fwd<T, Y, M, P>(vec, x, gate, y, out);
  }
};

template <typename T, typename Y, typename M, int P>
struct Bwd {
  static void run(bool vec, const at::Tensor& dout, const ModView& gate, const at::Tensor& y, at::Tensor& dgate,
                  at::Tensor& dy) {
    launch_bwd<T, Y, M, P>(vec, dout, gate, y, dgate, dy);
  }
};

}  // namespace

void gated_fwd(const at::Tensor& x, const ModView& gate, at::ScalarType mod_type, const at::Tensor& y,
               at::Tensor& out) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int P = cuda_elems_per_thread(x.scalar_type());
  const int64_t msize = mod_type == at::kFloat ? 4 : 2;
  const bool vec = x.size(2) % P == 0 && aligned_to(x.data_ptr(), 16) && aligned_to(out.data_ptr(), 16) &&
                   aligned_to(y.data_ptr(), std::min<int64_t>(16, P * y.element_size())) &&
                   vec_ok(gate.ptr, msize, P, gate.sb, gate.sn);
  dispatch<Fwd>(x.scalar_type(), y.scalar_type(), mod_type, vec, x, gate, y, out);
}

void gated_bwd(const at::Tensor& dout, const ModView& gate, at::ScalarType mod_type, const at::Tensor& y,
               at::Tensor& dgate, at::Tensor& dy) {
  if (dout.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dout.device());
  const int P = cuda_elems_per_thread(dout.scalar_type());
  const int64_t msize = mod_type == at::kFloat ? 4 : 2;
  const int64_t ybytes = std::min<int64_t>(16, P * y.element_size());
  const bool vec = dout.size(2) % P == 0 && aligned_to(dout.data_ptr(), 16) && aligned_to(y.data_ptr(), ybytes) &&
                   aligned_to(dy.data_ptr(), ybytes) && vec_ok(gate.ptr, msize, P, gate.sb, gate.sn) &&
                   (!gate.per_token || aligned_to(dgate.data_ptr(), std::min<int64_t>(16, P * msize)));
  dispatch<Bwd>(dout.scalar_type(), y.scalar_type(), mod_type, vec, dout, gate, y, dgate, dy);
}

}  // namespace cuda
}  // namespace rectok
