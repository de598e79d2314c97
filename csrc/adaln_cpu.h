// CPU implementation of the AdaLN ops and the test hook shared with the binding (adaln.cpp).
//
// Layouts (the binding normalises every input to these first):
//   x, y, dy, dout and every (B, N, D) output: contiguous
//   modulation (shift / scale / gate): a (B, Nm, D) view with unit inner stride, Nm in {1, N}, read at
//     ptr + b*sb + n*sn (sn = 0 per sample), so chunk views of the adaLN output need no copy
//   weight: contiguous fp32 (D,);  rstd: contiguous fp32 (B, N)
// Type combinations (T = activations, M = modulation, Y = gated-residual branch):
//   adaln:  (T, M) in {(f32, f32), (bf16, bf16), (bf16, f32)}
//   gated:  (T, Y, M) in {(f32, f32, f32), (f32, bf16, f32), (bf16, bf16, bf16), (bf16, bf16, f32)}
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rectok {

// Test hook: while on, every output and scratch buffer starts filled with NaN, so an element a
// kernel forgets to write shows up in the results (adaln_ext.poison_outputs()).
bool poison_outputs();
void set_poison_outputs(bool on);
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

struct ModView {
  const void* ptr = nullptr;
  int64_t sb = 0;           // batch stride (elements)
  int64_t sn = 0;           // token stride (elements); 0 for a per-sample modulation
  bool per_token = false;   // the view has N rows: its gradient is per token, not summed
};

namespace cpu {
void adaln_fwd(const at::Tensor& x, const at::Tensor& w, const ModView& shift, const ModView& scale, at::ScalarType mt,
               double eps, at::Tensor& out, at::Tensor& rstd);
// dx (T), dweight (fp32 (D,)), dshift (M, (B, 1, D); not touched when shift_tok: dshift is dy itself),
// dscale (M, (B, Nm, D)).
void adaln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const ModView& scale, at::ScalarType mt,
               const at::Tensor& rstd, bool shift_tok, bool scale_tok, at::Tensor& dx, at::Tensor& dweight,
               at::Tensor& dshift, at::Tensor& dscale);
void gated_fwd(const at::Tensor& x, const ModView& gate, at::ScalarType mt, const at::Tensor& y, at::Tensor& out);
// dgate (M, (B, Nm, D)), dy = gate * dout (Y).
void gated_bwd(const at::Tensor& dout, const ModView& gate, at::ScalarType mt, const at::Tensor& y, at::Tensor& dgate,
               at::Tensor& dy);
}  // namespace cpu

}  // namespace rectok
