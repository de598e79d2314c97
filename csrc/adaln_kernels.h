// Host entry points of the AdaLN CUDA kernels (adaln_cuda.cu, gated_residual_cuda.cu).
//
// Raw pointers and plain structs only (no ATen), so the .cu files compile in seconds and the binding
// (adaln.cpp) keeps every check, allocation and dtype decision. Layouts the binding guarantees:
//   x, dy, y, dout and every (B, N, D) output: contiguous
//   modulation (shift / scale / gate): read at ptr + b*sb + n*sn + d (unit inner stride; sn = 0 for a
//     per-sample modulation, sb = 0 when B == 1), so chunk views of the adaLN output need no copy
//   weight: contiguous fp32 (D,);  rstd: contiguous fp32 (B, N);  partial sums: fp32 (partial_rows, D)
// The launchers pick 16-byte vector accesses when D % E == 0 and every row start (tensors and
// modulation rows) is aligned to its chunk; otherwise the same kernels run with element-wise accesses.
// Each function returns the launch status (cudaGetLastError) for the binding to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "adaln_launch.h"

namespace rectok {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1 };

struct ModArg {
  const void* ptr = nullptr;
  int64_t sb = 0;
  int64_t sn = 0;
};

// out = round_T(x * rstd) * w * (1 + scale) + shift; rstd = rsqrt(mean(x^2) + eps). T = t, M = m:
// (f32, f32), (bf16, bf16), (bf16, f32).
struct AdalnFwdArgs {
  launch::RowConfig cfg;  // computed once by the binding (launch::row_config), used as is
  const void* x = nullptr;
  const float* w = nullptr;
  ModArg shift, scale;
  void* out = nullptr;
  float* rstd = nullptr;
  int64_t B = 0, N = 0, D = 0;
  float eps = 0.f;
  DType t = DType::F32, m = DType::F32;
};

// Backward of the modulated RMSNorm. Writes dx (T) and, for a per-token scale, dscale (M, (B, N, D));
// per-token dshift is dy itself (the autograd formula returns it, nothing is written here).
// A per-token scale requires shift_tok = true: with a per-sample shift the binding sums dy itself
// (a rare mix; it keeps the per-token kernel within its registers).
// Column sums: dweight (fp32 or bf16 per dweight_bf16) and, for per-sample modulation, dshift / dscale
// ((B, D), fp32 or bf16 per their flags) via the partial buffers pw / ps (fp32, cfg.partial_rows x D;
// ps only when the shift is per sample).
struct AdalnBwdArgs {
  launch::RowConfig cfg;  // computed once by the binding (launch::row_config), used as is
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* w = nullptr;
  ModArg scale;
  const float* rstd = nullptr;
  void* dx = nullptr;
  bool scale_tok = false, shift_tok = false;
  void* dscale = nullptr;  // per token: (B, N, D) in M; per sample: (B, D) in fp32 / bf16
  bool dscale_bf16 = false;
  void* dshift = nullptr;  // per sample only: (B, D) in fp32 / bf16
  bool dshift_bf16 = false;
  void* dweight = nullptr;
  bool dweight_bf16 = false;
  float* pw = nullptr;
  float* ps = nullptr;
  int64_t B = 0, N = 0, D = 0;
  DType t = DType::F32, m = DType::F32;
};

// out = x + gate * y. (T, Y, M) = (t, y, m): (f32, f32, f32), (f32, bf16, f32), (bf16, bf16, bf16), (bf16, bf16, f32).
struct GatedFwdArgs {
  launch::RowConfig cfg;  // computed once by the binding (launch::row_config), used as is
  const void* x = nullptr;
  ModArg gate;
  const void* y = nullptr;
  void* out = nullptr;
  int64_t B = 0, N = 0, D = 0;
  DType t = DType::F32, y_t = DType::F32, m = DType::F32;
};

// dy = gate * dout (Y); dgate = dout * y per token (M, (B, N, D)) or summed over tokens per sample
// ((B, D), fp32 / bf16 per dgate_bf16, through the partial buffer pg). dx = dout needs no kernel.
struct GatedBwdArgs {
  launch::RowConfig cfg;  // computed once by the binding (launch::row_config), used as is
  const void* dout = nullptr;
  ModArg gate;
  const void* y = nullptr;
  void* dy = nullptr;
  bool gate_tok = false;
  void* dgate = nullptr;
  bool dgate_bf16 = false;
  float* pg = nullptr;
  int64_t B = 0, N = 0, D = 0;
  DType t = DType::F32, y_t = DType::F32, m = DType::F32;
};

cudaError_t adaln_fwd(const AdalnFwdArgs& a, cudaStream_t stream);
cudaError_t adaln_bwd(const AdalnBwdArgs& a, cudaStream_t stream);
cudaError_t gated_fwd(const GatedFwdArgs& a, cudaStream_t stream);
cudaError_t gated_bwd(const GatedBwdArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace rectok
