// rectok_fast AdaLN extension: declarations shared by the binding (adaln.cpp) and the CUDA kernels.
//
// Layout conventions (the binding normalises every input to these before any kernel runs):
//   x, y, dy, outputs      contiguous (B, N, D)
//   modulation (shift/scale/gate)   a (B, Nm, D) view with unit inner stride, Nm in {1, N};
//                          read through its batch stride `sb` and token stride `sn` (sn = 0 when the
//                          modulation is per sample), so chunk views and expanded views need no copy.
//   weight                 contiguous fp32 (D,)
//   rstd                   contiguous fp32 (B, N)
// Type combinations (T = activations, M = modulation, Y = gated-residual branch):
//   adaln:  (T, M) in {(f32, f32), (bf16, bf16), (bf16, f32)}
//   gated:  (T, Y, M) in {(f32, f32, f32), (bf16, bf16, bf16), (bf16, bf16, f32), (f32, bf16, f32)}
// Other combinations are reduced to these by exact upcasts in the binding.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace rectok {

// One row (one token) of D elements is handled by one thread block on CUDA; each thread keeps
// cuda_elems_per_thread() = 8 elements of each tensor in registers (one 16-byte access for bf16, two
// for fp32 when rows are aligned). Blocks have at most 512 threads so that the kernels may use up to
// 128 registers without spilling: D <= 4096.
constexpr int kCudaMaxThreads = 512;

inline int cuda_elems_per_thread(at::ScalarType) { return 8; }

inline int64_t cuda_max_dim(at::ScalarType t) { return int64_t(kCudaMaxThreads) * cuda_elems_per_thread(t); }

// Threads per block for rows of width D: a multiple of the warp size covering D.
inline int cuda_threads_for(int64_t D, at::ScalarType t) {
  const int64_t per = cuda_elems_per_thread(t);
  int64_t threads = (D + per - 1) / per;
  threads = ((threads + 31) / 32) * 32;
  return int(threads < 32 ? 32 : threads);
}

// Rows of one sample handled by one block in the backward kernels. Fixed by the shape only (never
// by the thread count or the GPU), so the two-pass reductions are deterministic.
inline int64_t bwd_rows_per_block(int64_t N) { return N < 32 ? (N < 1 ? 1 : N) : 32; }

// Test hook: when enabled, every output and scratch buffer is allocated pre-filled with NaN, so an
// element a kernel forgets to write shows up in the results (adaln_ext.poison_outputs()).
bool poison_outputs();
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

struct ModView {
  const void* ptr = nullptr;
  int64_t sb = 0;  // batch stride (elements)
  int64_t sn = 0;  // token stride (elements); 0 for per-sample modulation
  bool per_token = false;  // the view has N rows (its gradient is written per token, not reduced)
};

#ifdef RECTOK_FAST_WITH_CUDA
namespace cuda {
// Modulated RMSNorm. out, rstd written fully.
void adaln_fwd(const at::Tensor& x, const at::Tensor& weight, const ModView& shift, const ModView& scale,
               at::ScalarType mod_type, double eps, at::Tensor& out, at::Tensor& rstd);
// dx (T), dweight (fp32, D), dshift / dscale (M, (B, Nm, D) contiguous).
void adaln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const ModView& scale,
               at::ScalarType mod_type, const at::Tensor& rstd, bool shift_per_token, bool scale_per_token,
               at::Tensor& dx, at::Tensor& dweight, at::Tensor& dshift, at::Tensor& dscale);
// Gated residual: out = x + gate * y.
void gated_fwd(const at::Tensor& x, const ModView& gate, at::ScalarType mod_type, const at::Tensor& y,
               at::Tensor& out);
// dy = gate * dout (Y), dgate (M, (B, Nm, D) contiguous).
void gated_bwd(const at::Tensor& dout, const ModView& gate, at::ScalarType mod_type, const at::Tensor& y,
               at::Tensor& dgate, at::Tensor& dy);
}  // namespace cuda
#endif

}  // namespace rectok
