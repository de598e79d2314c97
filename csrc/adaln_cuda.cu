// CUDA kernels of the modulated RMSNorm:
//   out = (round_T(x * rstd) * weight) * (1 + scale) + shift,  rstd = rsqrt(mean(x^2) + eps)   (fp32 math)
//
// Design: one thread block per row (token) of D elements; each thread keeps P = 8 elements
// in registers (16-byte loads per tensor when rows are aligned, see cuda_utils.cuh), so
// x is read once and out written once; the row sum goes through a fixed-order block reduction.
// Modulation rows are read through their batch/token strides (chunk views and stride-0 expanded
// views are used as they are).
//
// Backward: grid (row chunks, B); a block walks bwd_rows_per_block(N) consecutive tokens of one
// sample, writes dx per row, and accumulates the weight gradient (and, for per-sample modulation, the
// shift/scale gradients) per thread in fp32. The per-block partial rows go to a scratch buffer that a
// second kernel sums in index order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "adaln.h"
#include "cuda_utils.cuh"

namespace rectok {
namespace cuda {

using bf16 = c10::BFloat16;

template <typename T, typename M, int P, bool VEC>
__global__ void __launch_bounds__(kCudaMaxThreads)
adaln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                 const M* __restrict__ shift, int64_t sh_sb, int64_t sh_sn,
                 const M* __restrict__ scale, int64_t sc_sb, int64_t sc_sn,
                 T* __restrict__ out, float* __restrict__ rstd, int64_t N, int D, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row - b * N;
  float xv[P];
  load_row<T, P, VEC>(x + row * D, D, xv);
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < P; ++j) ss += xv[j] * xv[j];
  ss = block_sum(ss, smem);
  const float r = rsqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  float wv[P], sh[P], sc[P], o[P];
  load_row<float, P, VEC>(w, D, wv);
  load_row<M, P, VEC>(shift + b * sh_sb + n * sh_sn, D, sh);
  load_row<M, P, VEC>(scale + b * sc_sb + n * sc_sn, D, sc);
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const float a = round_through<T>(xv[j] * r) * wv[j];
    o[j] = a * (1.f + sc[j]) + sh[j];
  }
  store_row<T, P, VEC>(out + row * D, D, o);
}

template <typename T, typename M, int P, bool VEC>
__global__ void __launch_bounds__(kCudaMaxThreads)
adaln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                 const M* __restrict__ scale, int64_t sc_sb, int64_t sc_sn, const float* __restrict__ rstd,
                 T* __restrict__ dx, M* __restrict__ dshift, M* __restrict__ dscale,
                 bool shift_tok, bool scale_tok,
                 float* __restrict__ wpart, float* __restrict__ shpart, float* __restrict__ scpart,
                 int64_t N, int D, int64_t rows_per_block) {
  __shared__ float smem[32];
  const int64_t c = blockIdx.x, b = blockIdx.y, nchunks = gridDim.x;
  const int64_t n0 = c * rows_per_block;
  const int64_t n1 = n0 + rows_per_block < N ? n0 + rows_per_block : N;
  const float inv_d = 1.f / float(D);

  float wv[P], sc[P];
  float accw[P], accsh[P], accsc[P];
  load_row<float, P, VEC>(w, D, wv);
  if (!scale_tok) load_row<M, P, VEC>(scale + b * sc_sb, D, sc);
#pragma unroll
  for (int j = 0; j < P; ++j) accw[j] = accsh[j] = accsc[j] = 0.f;

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = b * N + n;
    float xv[P], gy[P], g[P], dsc[P];
    load_row<T, P, VEC>(x + row * D, D, xv);
    load_row<T, P, VEC>(dy + row * D, D, gy);
    if (scale_tok) load_row<M, P, VEC>(scale + b * sc_sb + n * sc_sn, D, sc);
    const float r = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const float xh = xv[j] * r;
      const float xr = round_through<T>(xh);
      const float gs = gy[j] * (1.f + sc[j]);   // d out / d (xr * w)
      accw[j] += gs * xr;
      g[j] = gs * wv[j];                        // d out / d xhat
      dot += g[j] * xh;
      dsc[j] = gy[j] * (xr * wv[j]);
      accsh[j] += gy[j];
      accsc[j] += dsc[j];
    }
    if (shift_tok) store_row<M, P, VEC>(dshift + row * D, D, gy);
    if (scale_tok) store_row<M, P, VEC>(dscale + row * D, D, dsc);
    const float m = block_sum(dot, smem) * inv_d;
#pragma unroll
    for (int j = 0; j < P; ++j) g[j] = r * (g[j] - xv[j] * r * m);
    store_row<T, P, VEC>(dx + row * D, D, g);
  }
  const int64_t prow = b * nchunks + c;
  store_row<float, P, VEC>(wpart + prow * D, D, accw);
  if (!shift_tok) store_row<float, P, VEC>(shpart + prow * D, D, accsh);
  if (!scale_tok) store_row<float, P, VEC>(scpart + prow * D, D, accsc);
}

namespace {

// A view can be read with P-element vectors when its start and every row start are aligned.
bool vec_ok(const void* p, int64_t elem_size, int P, int64_t sb, int64_t sn) {
  const int64_t bytes = std::min<int64_t>(16, int64_t(P) * elem_size);
  return aligned_to(p, bytes) && sb % P == 0 && sn % P == 0;
}

template <typename T, typename M, int P>
void launch_fwd(bool vec, const at::Tensor& x, const at::Tensor& weight, const ModView& shift,
                const ModView& scale, double eps, at::Tensor& out, at::Tensor& rstd) {
  const int64_t B = x.size(0), N = x.size(1);
  const int D = int(x.size(2));
  const dim3 grid(unsigned(B * N)), block(cuda_threads_for(D, x.scalar_type()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto k = vec ? adaln_fwd_kernel<T, M, P, true> : adaln_fwd_kernel<T, M, P, false>;
  k<<<grid, block, 0, stream>>>(x.data_ptr<T>(), weight.data_ptr<float>(),
                                static_cast<const M*>(shift.ptr), shift.sb, shift.sn,
                                static_cast<const M*>(scale.ptr), scale.sb, scale.sn,
                                out.data_ptr<T>(), rstd.data_ptr<float>(), N, D, float(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename M, int P>
void launch_bwd(bool vec, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                const ModView& scale, const at::Tensor& rstd, bool shift_tok, bool scale_tok,
                at::Tensor& dx, at::Tensor& dweight, at::Tensor& dshift, at::Tensor& dscale) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t R = bwd_rows_per_block(N);
  const int64_t nchunks = (N + R - 1) / R;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor wpart = new_buffer({B * nchunks, D}, f32);
  at::Tensor shpart = shift_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  at::Tensor scpart = scale_tok ? at::Tensor() : new_buffer({B * nchunks, D}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(B)), block(cuda_threads_for(D, x.scalar_type()));
  auto k = vec ? adaln_bwd_kernel<T, M, P, true> : adaln_bwd_kernel<T, M, P, false>;
  k<<<grid, block, 0, stream>>>(dy.data_ptr<T>(), x.data_ptr<T>(), weight.data_ptr<float>(),
                                static_cast<const M*>(scale.ptr), scale.sb, scale.sn, rstd.data_ptr<float>(),
                                dx.data_ptr<T>(), shift_tok ? dshift.data_ptr<M>() : nullptr,
                                scale_tok ? dscale.data_ptr<M>() : nullptr, shift_tok, scale_tok,
                                wpart.data_ptr<float>(), shift_tok ? nullptr : shpart.data_ptr<float>(),
                                scale_tok ? nullptr : scpart.data_ptr<float>(), N, int(D), R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials(wpart, 1, B * nchunks, D, dweight, stream);
  if (!shift_tok) sum_partials(shpart, B, nchunks, D, dshift, stream);
  if (!scale_tok) sum_partials(scpart, B, nchunks, D, dscale, stream);
}

}  // namespace

void adaln_fwd(const at::Tensor& x, const at::Tensor& weight, const ModView& shift, const ModView& scale,
               at::ScalarType mod_type, double eps, at::Tensor& out, at::Tensor& rstd) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto T = x.scalar_type();
  const int P = cuda_elems_per_thread(T);
  const int64_t msize = mod_type == at::kFloat ? 4 : 2;
  const bool vec = x.size(2) % P == 0 && aligned_to(x.data_ptr(), 16) && aligned_to(out.data_ptr(), 16) &&
                   aligned_to(weight.data_ptr(), 16) && vec_ok(shift.ptr, msize, P, shift.sb, shift.sn) &&
                   vec_ok(scale.ptr, msize, P, scale.sb, scale.sn);
  if (T == at::kFloat) {
    launch_fwd<float, float, 8>(vec, x, weight, shift, scale, eps, out, rstd);
  } else if (mod_type == at::kBFloat16) {
    launch_fwd<bf16, bf16, 8>(vec, x, weight, shift, scale, eps, out, rstd);
  } else {
    launch_fwd<bf16, float, 8>(vec, x, weight, shift, scale, eps, out, rstd);
  }
}

void adaln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const ModView& scale,
               at::ScalarType mod_type, const at::Tensor& rstd, bool shift_per_token, bool scale_per_token,
               at::Tensor& dx, at::Tensor& dweight, at::Tensor& dshift, at::Tensor& dscale) {
  if (x.numel() == 0) return;  // the binding zero-fills the parameter gradients of empty inputs
  const c10::cuda::CUDAGuard guard(x.device());
  const auto T = x.scalar_type();
  const int P = cuda_elems_per_thread(T);
  const int64_t msize = mod_type == at::kFloat ? 4 : 2;
  const bool vec = x.size(2) % P == 0 && aligned_to(x.data_ptr(), 16) && aligned_to(dy.data_ptr(), 16) &&
                   aligned_to(dx.data_ptr(), 16) && aligned_to(weight.data_ptr(), 16) &&
                   vec_ok(scale.ptr, msize, P, scale.sb, scale.sn) &&
                   (!shift_per_token || aligned_to(dshift.data_ptr(), 16)) &&
                   (!scale_per_token || aligned_to(dscale.data_ptr(), 16));
  if (T == at::kFloat) {
    launch_bwd<float, float, 8>(vec, dy, x, weight, scale, rstd, shift_per_token, scale_per_token, dx, dweight,
                                dshift, dscale);
  } else if (mod_type == at::kBFloat16) {
    launch_bwd<bf16, bf16, 8>(vec, dy, x, weight, scale, rstd, shift_per_token, scale_per_token, dx, dweight,
                              dshift, dscale);
  } else {
    launch_bwd<bf16, float, 8>(vec, dy, x, weight, scale, rstd, shift_per_token, scale_per_token, dx, dweight,
                               dshift, dscale);
  }
}

}  // namespace cuda
}  // namespace rectok
