// rectok_fast._C: the AdaLN ops as dispatcher operators. Schemas (TORCH_LIBRARY), input checks, the
// CPU / CUDA dispatch, Meta kernels (shapes only, symbolic sizes: what torch.compile traces with), and
// the autograd formulas as C++ autograd Functions (Autograd key), so an eager call goes
// Python -> dispatcher -> C++ without any Python custom-op machinery.
// CPU kernels: adaln_cpu.cpp. CUDA kernels: adaln_cuda.cu, gated_residual_cuda.cu (adaln_kernels.h).
//
// Ops (reference semantics: rectok_fast/ops/reference.py):
//   rectok_fast::adaln_modulate_fwd(x, weight, shift, scale, eps) -> (out, rstd)
//       out = round_T(x * rstd) * weight * (1 + scale) + shift,  rstd = rsqrt(mean(x^2) + eps)  (B, N) fp32
//   rectok_fast::adaln_modulate_bwd(grad_out, x, weight, shift, scale, rstd) -> (dx, dweight, dshift, dscale)
//       dshift is an empty (0,) tensor when shift is per token: its gradient is grad_out itself, which
//       the autograd formula returns without a copy (an op output may not alias an input).
//   rectok_fast::gated_residual_fwd(x, gate, y) -> x + gate * y
//   rectok_fast::gated_residual_bwd(grad_out, gate, y) -> (dgate, dy)   (dx = grad_out, from autograd)
// x, y: (B, N, D); weight: (D,); shift / scale / gate: (B, D), (B, 1, D) or (B, N, D), any strides
// (chunk views of one adaLN output are read in place). Math in fp32; outputs in x's dtype; each gradient
// in the shape and dtype of its input. Reductions run in a shape-determined order: deterministic.
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "adaln_cpu.h"
#include "adaln_launch.h"

#ifdef RECTOK_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adaln_kernels.h"
#endif

namespace rectok {
namespace {

// ----------------------------------------------------------------------------------------------
// Checks (shared by the real and the Meta kernels; sizes read as SymInts so symbolic shapes work)
// ----------------------------------------------------------------------------------------------

bool supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

// "torch.float16": the name Python users see.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), op, ": ", name, " must be float32 or bfloat16, got ",
                   dtype_name(t.scalar_type()));
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all inputs must be on the same device");
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (B, N, D), got a ", x.dim(), "-d tensor of shape ",
                    x.sym_sizes());
  check_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.sym_size(2) >= 1, op, ": the feature dimension D must be at least 1, got shape ",
                    x.sym_sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda() || x.device().is_meta(), op, ": tensors on ",
                    x.device(), " are not supported (cpu or cuda)");
}

// Checks a modulation tensor against x; true when it is per token ((B, N, D)), false per sample.
bool check_mod(const at::Tensor& m, const at::Tensor& x, const char* op, const char* name) {
  check_dtype(m, op, name);
  check_device(m, x, op, name);
  const c10::SymInt &B = x.sym_size(0), &N = x.sym_size(1), &D = x.sym_size(2);
  const bool ok2 = m.dim() == 2 && m.sym_size(0) == B && m.sym_size(1) == D;
  const bool ok3 = m.dim() == 3 && m.sym_size(0) == B && m.sym_size(2) == D &&
                   (m.sym_size(1) == 1 || m.sym_size(1) == N);
  TORCH_CHECK_VALUE(ok2 || ok3, op, ": ", name, " must be (B, D), (B, 1, D) or (B, N, D) for x of shape ",
                    x.sym_sizes(), "; got ", m.sym_sizes());
  return m.dim() == 3 && m.sym_size(1) == N;
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  check_dtype(weight, op, "weight");
  check_device(weight, x, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(2), op, ": weight must be (",
                    x.sym_size(2), ",) for x of shape ", x.sym_sizes(), "; got ", weight.sym_sizes());
}

void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

struct AdalnShapes {
  bool shift_tok, scale_tok;
};

AdalnShapes check_adaln(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift,
                        const at::Tensor& scale, const char* op) {
  check_x(x, op);
  check_weight(weight, x, op);
  return {check_mod(shift, x, op, "shift"), check_mod(scale, x, op, "scale")};
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_device(t, x, op, name);
  TORCH_CHECK_VALUE(t.sym_sizes() == x.sym_sizes(), op, ": ", name, " must have x's shape ", x.sym_sizes(),
                    ", got ", t.sym_sizes());
}

void check_grad(const at::Tensor& g, const at::Tensor& x, const char* op) {
  check_same(g, x, op, "the output gradient");
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), op, ": the output gradient must have x's dtype ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(g.scalar_type()));
}

void check_rstd(const at::Tensor& rstd, const at::Tensor& x, const char* op) {
  check_device(rstd, x, op, "rstd");
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.dim() == 2 && rstd.sym_size(0) == x.sym_size(0) &&
                        rstd.sym_size(1) == x.sym_size(1),
                    op, ": rstd must be float32 (B, N) = ", x.sym_sizes().slice(0, 2), ", got ", rstd.sym_sizes(),
                    " ", dtype_name(rstd.scalar_type()));
}

void check_gated(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, const char* op) {
  check_x(x, op);
  check_dtype(y, op, "y");
  TORCH_CHECK_VALUE(y.sym_sizes() == x.sym_sizes(), op, ": x ", x.sym_sizes(), " and y ", y.sym_sizes(),
                    " must both be (B, N, D)");
  check_device(y, x, op, "y");
  check_mod(gate, x, op, "gate");
}

// ----------------------------------------------------------------------------------------------
// Input normalisation for the kernels
// ----------------------------------------------------------------------------------------------

// The modulation's compute dtype: fp32 unless the activations and every modulation are bf16.
at::ScalarType mod_type_for(at::ScalarType xt, const at::Tensor& a, const at::Tensor& b) {
  if (xt == at::kFloat) return at::kFloat;
  return (a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16) ? at::kBFloat16 : at::kFloat;
}

// A modulation as a (B, Nm, D) view with unit inner stride (no copy for chunk or expanded views).
struct Mod {
  at::Tensor view;  // keeps an upcast / copied storage alive
  ModView mv;
};

Mod prep_mod(const at::Tensor& m, const at::Tensor& x, at::ScalarType mtype, bool per_token) {
  // Strides are read off m itself; a tensor op (upcast / copy) runs only when the layout needs one.
  const int64_t B = x.size(0), D = x.size(2);
  Mod r;
  const at::Tensor* v = &m;
  if (m.scalar_type() != mtype || (D > 1 && m.stride(m.dim() - 1) != 1)) {
    r.view = m.to(mtype).contiguous();  // only exact upcasts (bf16 -> fp32) change values here
    v = &r.view;
  }
  const bool two_d = v->dim() == 2;
  r.mv.ptr = v->data_ptr();
  r.mv.sb = B > 1 ? v->stride(0) : 0;
  r.mv.sn = (!two_d && v->size(1) > 1) ? v->stride(1) : 0;
  r.mv.per_token = per_token;
  if (!r.view.defined()) r.view = m;
  return r;
}

// A gradient computed as a contiguous (B, Nm, D) tensor, returned in the input's shape and dtype.
at::Tensor as_input(const at::Tensor& g, const at::Tensor& like) {
  at::Tensor r = g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type());
  return r.view(like.sizes());
}

at::Tensor prep_weight(const at::Tensor& weight) {
  if (weight.scalar_type() == at::kFloat && weight.is_contiguous()) return weight;
  return weight.to(at::kFloat).contiguous();
}

#ifdef RECTOK_FAST_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType t) { return t == at::kFloat ? cuda::DType::F32 : cuda::DType::BF16; }

cuda::ModArg mod_arg(const ModView& m) { return {m.ptr, m.sb, m.sn}; }

// The CUDA kernels' shape limits (adaln_launch.h), as a clear error before any launch.
launch::RowConfig cuda_config(launch::Kernel k, const at::Tensor& x, const char* op) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const auto cfg = launch::row_config(k, B, N, D, int(x.element_size()));
  TORCH_CHECK_VALUE(cfg.ok, op, ": D = ", D, " is larger than the CUDA kernels support for ",
                    dtype_name(x.scalar_type()), " (at most ", cfg.max_dim, ": one row group of threads holds a row, ",
                    cfg.cpt * cfg.elems, " elements per thread)");
  TORCH_CHECK_VALUE(cfg.grid_y <= 65535 && cfg.grid_x <= 2147483647, op,
                    ": the CUDA kernels support at most 65535 samples per call, got B = ", B);
  return cfg;
}
#endif

void require_cuda_build(const at::Tensor& x, const char* op) {
#ifndef RECTOK_FAST_WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), op, ": rectok_fast._C was built without CUDA kernels (RECTOK_FAST_SKIP_CUDA=1, "
              "no nvcc, or a CPU-only torch); rebuild it to use CUDA tensors");
#else
  (void)x;
  (void)op;
#endif
}

// ----------------------------------------------------------------------------------------------
// Real kernels (registered for CPU and CUDA)
// ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                             const at::Tensor& shift, const at::Tensor& scale, double eps) {
  const char* op = "rectok_fast adaln_modulate";
  const AdalnShapes s = check_adaln(x_in, weight, shift, scale, op);
  check_eps(eps, op);
  require_cuda_build(x_in, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = new_buffer(x.sizes(), x.options());
  at::Tensor rstd = new_buffer({B, N}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, rstd};
  const at::Tensor w = prep_weight(weight);
  const auto mt = mod_type_for(x.scalar_type(), shift, scale);
  const Mod sh = prep_mod(shift, x, mt, s.shift_tok), sc = prep_mod(scale, x, mt, s.scale_tok);
  if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    const auto cfg = cuda_config(launch::Kernel::AdalnFwd, x, op);
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::AdalnFwdArgs a;
    a.cfg = cfg;
    a.x = x.data_ptr();
    a.w = w.data_ptr<float>();
    a.shift = mod_arg(sh.mv);
    a.scale = mod_arg(sc.mv);
    a.out = out.data_ptr();
    a.rstd = rstd.data_ptr<float>();
    a.B = B, a.N = N, a.D = x.size(2);
    a.eps = float(eps);
    a.t = cuda_dtype(x.scalar_type()), a.m = cuda_dtype(mt);
    C10_CUDA_CHECK(cuda::adaln_fwd(a, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    cpu::adaln_fwd(x, w, sh.mv, sc.mv, mt, eps, out, rstd);
  }
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                     const at::Tensor& weight, const at::Tensor& shift,
                                                                     const at::Tensor& scale, const at::Tensor& rstd_in) {
  const char* op = "rectok_fast adaln_modulate backward";
  const AdalnShapes s = check_adaln(x_in, weight, shift, scale, op);
  check_grad(dy_in, x_in, op);
  check_rstd(rstd_in, x_in, op);
  require_cuda_build(x_in, op);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const auto mt = mod_type_for(x.scalar_type(), shift, scale);
  const auto mopt = x.options().dtype(mt);
  at::Tensor dx = new_buffer(x.sizes(), x.options());
  // Per-token dshift is grad_out itself (returned by the autograd formula): the op gives an empty tensor.
  at::Tensor dshift_empty = s.shift_tok ? at::empty({0}, shift.options()) : at::Tensor();
  if (x.numel() == 0) {
    at::Tensor dshift = s.shift_tok ? dshift_empty : at::zeros(shift.sizes(), shift.options());
    return {dx, at::zeros(weight.sizes(), weight.options()), dshift, at::zeros(scale.sizes(), scale.options())};
  }
  const at::Tensor w = prep_weight(weight);
  const Mod sc = prep_mod(scale, x, mt, s.scale_tok);
  if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    const auto cfg = cuda_config(launch::Kernel::AdalnBwd, x, op);
    const c10::cuda::CUDAGuard guard(x.device());
    auto f32 = x.options().dtype(at::kFloat);
    // Per-sample gradients are written by the finish kernel in their final dtype; per-token dscale in M.
    at::Tensor dweight = new_buffer(weight.sizes(), weight.options());
    at::Tensor dshift = s.shift_tok ? dshift_empty : s.scale_tok ? at::Tensor() : new_buffer(shift.sizes(), shift.options());
    at::Tensor dscale = s.scale_tok ? new_buffer({B, N, D}, mopt) : new_buffer(scale.sizes(), scale.options());
    at::Tensor pw = new_buffer({cfg.partial_rows, D}, f32);
    at::Tensor ps = s.shift_tok || s.scale_tok ? at::Tensor() : new_buffer({cfg.partial_rows, D}, f32);
    cuda::AdalnBwdArgs a;
    a.cfg = cfg;
    a.dy = dy.data_ptr();
    a.x = x.data_ptr();
    a.w = w.data_ptr<float>();
    a.scale = mod_arg(sc.mv);
    a.rstd = rstd.data_ptr<float>();
    a.dx = dx.data_ptr();
    // A per-token scale with a per-sample shift (a rare mix): the kernel runs its per-token variant and
    // dshift is summed here (a deterministic ATen reduction over tokens, fp32 accumulation).
    const bool mixed = s.scale_tok && !s.shift_tok;
    a.scale_tok = s.scale_tok, a.shift_tok = s.shift_tok || mixed;
    a.dscale = dscale.data_ptr();
    a.dscale_bf16 = dscale.scalar_type() == at::kBFloat16;
    a.dshift = a.shift_tok ? nullptr : dshift.data_ptr();
    a.dshift_bf16 = shift.scalar_type() == at::kBFloat16;
    a.dweight = dweight.data_ptr();
    a.dweight_bf16 = weight.scalar_type() == at::kBFloat16;
    a.pw = pw.data_ptr<float>();
    a.ps = a.shift_tok ? nullptr : ps.data_ptr<float>();
    a.B = B, a.N = N, a.D = D;
    a.t = cuda_dtype(x.scalar_type()), a.m = cuda_dtype(mt);
    C10_CUDA_CHECK(cuda::adaln_bwd(a, c10::cuda::getCurrentCUDAStream()));
    if (mixed) dshift = as_input(at::sum(dy, {1}, /*keepdim=*/true, at::kFloat), shift);
    return {dx, dweight, dshift, s.scale_tok ? as_input(dscale, scale) : dscale};
#endif
  }
  at::Tensor dweight = new_buffer({D}, x.options().dtype(at::kFloat));
  at::Tensor dshift = s.shift_tok ? at::Tensor() : new_buffer({B, 1, D}, mopt);
  at::Tensor dscale = new_buffer({B, s.scale_tok ? N : 1, D}, mopt);
  cpu::adaln_bwd(dy, x, w, sc.mv, mt, rstd, s.shift_tok, s.scale_tok, dx, dweight, dshift, dscale);
  return {dx, dweight.to(weight.scalar_type()), s.shift_tok ? dshift_empty : as_input(dshift, shift),
          as_input(dscale, scale)};
}

at::Tensor gated_fwd(const at::Tensor& x_in, const at::Tensor& gate, const at::Tensor& y_in) {
  const char* op = "rectok_fast gated_residual";
  check_gated(x_in, gate, y_in, op);
  require_cuda_build(x_in, op);
  const auto out_dtype = x_in.scalar_type();
  // x bf16 with y fp32: compute in fp32 (exact upcast of x) and round once, as the reference does.
  const bool up = out_dtype == at::kBFloat16 && y_in.scalar_type() == at::kFloat;
  const at::Tensor x = (up ? x_in.to(at::kFloat) : x_in).contiguous();
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = new_buffer(x.sizes(), x.options());
  if (x.numel() == 0) return up ? out.to(out_dtype) : out;
  const auto mt = mod_type_for(x.scalar_type(), gate, gate);
  const Mod g = prep_mod(gate, x, mt, gate.dim() == 3 && gate.size(1) == x.size(1));
  if (x.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    const auto cfg = cuda_config(launch::Kernel::GatedFwd, x, op);
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::GatedFwdArgs a;
    a.cfg = cfg;
    a.x = x.data_ptr();
    a.gate = mod_arg(g.mv);
    a.y = y.data_ptr();
    a.out = out.data_ptr();
    a.B = x.size(0), a.N = x.size(1), a.D = x.size(2);
    a.t = cuda_dtype(x.scalar_type()), a.y_t = cuda_dtype(y.scalar_type()), a.m = cuda_dtype(mt);
    C10_CUDA_CHECK(cuda::gated_fwd(a, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    cpu::gated_fwd(x, g.mv, mt, y, out);
  }
  return up ? out.to(out_dtype) : out;
}

std::tuple<at::Tensor, at::Tensor> gated_bwd(const at::Tensor& dout_in, const at::Tensor& gate, const at::Tensor& y_in) {
  const char* op = "rectok_fast gated_residual backward";
  check_gated(dout_in, gate, y_in, op);
  require_cuda_build(dout_in, op);
  const bool up = dout_in.scalar_type() == at::kBFloat16 && y_in.scalar_type() == at::kFloat;
  const at::Tensor dout = (up ? dout_in.to(at::kFloat) : dout_in).contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t B = dout.size(0), N = dout.size(1), D = dout.size(2);
  const bool tok = gate.dim() == 3 && gate.size(1) == N;
  at::Tensor dy = new_buffer(y.sizes(), y.options());
  if (dout.numel() == 0) return {at::zeros(gate.sizes(), gate.options()), dy};
  const auto mt = mod_type_for(dout.scalar_type(), gate, gate);
  const Mod g = prep_mod(gate, dout, mt, tok);
  if (dout.is_cuda()) {
#ifdef RECTOK_FAST_WITH_CUDA
    const auto cfg = cuda_config(tok ? launch::Kernel::GatedBwdToken : launch::Kernel::GatedBwdSample, dout, op);
    const c10::cuda::CUDAGuard guard(dout.device());
    at::Tensor dgate = tok ? new_buffer({B, N, D}, dout.options().dtype(mt)) : new_buffer(gate.sizes(), gate.options());
    at::Tensor pg = tok ? at::Tensor() : new_buffer({cfg.partial_rows, D}, dout.options().dtype(at::kFloat));
    cuda::GatedBwdArgs a;
    a.cfg = cfg;
    a.dout = dout.data_ptr();
    a.gate = mod_arg(g.mv);
    a.y = y.data_ptr();
    a.dy = dy.data_ptr();
    a.gate_tok = tok;
    a.dgate = dgate.data_ptr();
    a.dgate_bf16 = dgate.scalar_type() == at::kBFloat16;
    a.pg = tok ? nullptr : pg.data_ptr<float>();
    a.B = B, a.N = N, a.D = D;
    a.t = cuda_dtype(dout.scalar_type()), a.y_t = cuda_dtype(y.scalar_type()), a.m = cuda_dtype(mt);
    C10_CUDA_CHECK(cuda::gated_bwd(a, c10::cuda::getCurrentCUDAStream()));
    return {tok ? as_input(dgate, gate) : dgate, dy};
#endif
  }
  at::Tensor dgate = new_buffer({B, tok ? N : 1, D}, dout.options().dtype(mt));
  cpu::gated_bwd(dout, g.mv, mt, y, dgate, dy);
  return {as_input(dgate, gate), dy};
}

// ----------------------------------------------------------------------------------------------
// Meta kernels: the same checks, outputs of the right shape / dtype / strides (all contiguous)
// ----------------------------------------------------------------------------------------------

at::Tensor meta_like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

std::tuple<at::Tensor, at::Tensor> adaln_fwd_meta(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& shift, const at::Tensor& scale, double eps) {
  const char* op = "rectok_fast adaln_modulate";
  check_adaln(x, weight, shift, scale, op);
  check_eps(eps, op);
  return {meta_like(x), at::empty_symint(x.sym_sizes().slice(0, 2), x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_bwd_meta(const at::Tensor& dy, const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& shift,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& rstd) {
  const char* op = "rectok_fast adaln_modulate backward";
  const AdalnShapes s = check_adaln(x, weight, shift, scale, op);
  check_grad(dy, x, op);
  check_rstd(rstd, x, op);
  at::Tensor dshift = s.shift_tok ? at::empty({0}, shift.options()) : meta_like(shift);
  return {meta_like(x), meta_like(weight), dshift, meta_like(scale)};
}

at::Tensor gated_fwd_meta(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_gated(x, gate, y, "rectok_fast gated_residual");
  return meta_like(x);
}

std::tuple<at::Tensor, at::Tensor> gated_bwd_meta(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& y) {
  check_gated(dout, gate, y, "rectok_fast gated_residual backward");
  return {meta_like(gate), meta_like(y)};
}

// ----------------------------------------------------------------------------------------------
// Autograd: hand-written graph nodes (as PyTorch's generated VariableType code builds them), not
// torch::autograd::Function: Function::apply pays for a context object, an IValue map, output
// wrapping with view / dirty / non-differentiable bookkeeping and a second copy of the saved
// tensors -- several microseconds per call, more than the op itself on small tensors.
// ----------------------------------------------------------------------------------------------

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using AdalnFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, double);
using AdalnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using GatedFwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using GatedBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Looked up once (function-local statics: the schemas are registered when the library loads).
const c10::TypedOperatorHandle<AdalnFwdSig>& adaln_fwd_op() {
  static const auto h = op_handle<AdalnFwdSig>("rectok_fast::adaln_modulate_fwd");
  return h;
}
const c10::TypedOperatorHandle<AdalnBwdSig>& adaln_bwd_op() {
  static const auto h = op_handle<AdalnBwdSig>("rectok_fast::adaln_modulate_bwd");
  return h;
}
const c10::TypedOperatorHandle<GatedFwdSig>& gated_fwd_op() {
  static const auto h = op_handle<GatedFwdSig>("rectok_fast::gated_residual_fwd");
  return h;
}
const c10::TypedOperatorHandle<GatedBwdSig>& gated_bwd_op() {
  static const auto h = op_handle<GatedBwdSig>("rectok_fast::gated_residual_bwd");
  return h;
}

// A gradient that is grad_out itself (per-token dshift, gated dx), in the input's dtype.
at::Tensor passthrough(const at::Tensor& g, at::ScalarType dtype) { return g.scalar_type() == dtype ? g : g.to(dtype); }

// Next edges: x, weight, shift, scale (eps is not a tensor).
struct AdalnBackward : public Node {
  SavedVariable x_, weight_, scale_, rstd_;
  // shift's values are never read by the backward (dshift is grad_out itself per token, its column sum
  // per sample): only its shape and dtype are kept, not the tensor (one SavedVariable less per call).
  std::vector<c10::SymInt> shift_sizes_;
  at::ScalarType shift_dtype_ = at::kFloat;
  std::string name() const override { return "AdalnModulateBackward"; }
  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    scale_.reset_data();
    rstd_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(4);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;  // the output was not used: no gradient flows
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), scale = scale_.unpack(), rstd = rstd_.unpack();
    // A stand-in with shift's shape and dtype (one element, expanded): the backward op reads its metadata only.
    const at::Tensor shift = at::empty({1}, x.options().dtype(shift_dtype_)).expand_symint(shift_sizes_);
    auto [dx, dweight, dshift, dscale] = adaln_bwd_op().call(g, x, weight, shift, scale, rstd);
    const bool shift_tok = shift.dim() == 3 && shift.sym_size(1) == x.sym_size(1);
    if (shift_tok) dshift = passthrough(g, shift_dtype_);
    out[0] = std::move(dx), out[1] = std::move(dweight), out[2] = std::move(dshift), out[3] = std::move(dscale);
    return out;
  }
};

// Next edges: x, gate, y.
struct GatedBackward : public Node {
  SavedVariable gate_, y_;
  at::ScalarType x_dtype_ = at::kFloat;
  std::string name() const override { return "GatedResidualBackward"; }
  void release_variables() override {
    gate_.reset_data();
    y_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    // d out / d x is the identity: the incoming gradient is dx (out has x's dtype).
    if (task_should_compute_output(0)) out[0] = passthrough(g, x_dtype_);
    if (task_should_compute_output(1) || task_should_compute_output(2)) {
      auto [dgate, dy] = gated_bwd_op().call(g, gate_.unpack(), y_.unpack());
      out[1] = std::move(dgate), out[2] = std::move(dy);
    }
    return out;
  }
};

template <typename... Ts>
bool needs_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (... || ts.requires_grad());
}

std::tuple<at::Tensor, at::Tensor> adaln_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& shift, const at::Tensor& scale, double eps) {
  std::tuple<at::Tensor, at::Tensor> r;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    r = adaln_fwd_op().call(x, weight, shift, scale, eps);
  }
  // Without anything to differentiate there is no node and nothing saved: the inference / no-grad
  // call costs one redispatch.
  if (!needs_grad(x, weight, shift, scale)) return r;
  auto node = c10::make_intrusive<AdalnBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, shift, scale));
  node->x_ = SavedVariable(x, false);
  node->weight_ = SavedVariable(weight, false);
  node->shift_sizes_ = shift.sym_sizes().vec();
  node->shift_dtype_ = shift.scalar_type();
  node->scale_ = SavedVariable(scale, false);
  node->rstd_ = SavedVariable(std::get<1>(r), false);  // an output without history: no reference cycle
  torch::autograd::set_history(std::get<0>(r), node);   // rstd stays non-differentiable
  return r;
}

at::Tensor gated_fwd_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = gated_fwd_op().call(x, gate, y);
  }
  if (!needs_grad(x, gate, y)) return out;
  auto node = c10::make_intrusive<GatedBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, gate, y));
  // gate and y are saved only when their gradients are wanted (dx alone is grad_out itself).
  if (node->should_compute_output(1) || node->should_compute_output(2)) {
    node->gate_ = SavedVariable(gate, false);
    node->y_ = SavedVariable(y, false);
  }
  node->x_dtype_ = x.scalar_type();
  torch::autograd::set_history(out, node);
  return out;
}

// ----------------------------------------------------------------------------------------------
// Eager entry points for Python (rectok_fast.ops): one C call into the dispatcher, without the
// torch.ops layer (OpOverload.__call__, the schema-driven argument parsing into an IValue stack and
// the boxed call). They take only the case the dispatcher would handle identically: plain tensors
// (torch.Tensor or nn.Parameter, no __torch_function__ subclass), no active TorchFunctionMode, x of
// a dtype and device the kernels take. Anything else returns None and the caller goes through
// torch.ops (which handles subclasses and modes, and raises the usual errors). Dispatch-level
// machinery (autograd, autocast, TorchDispatchModes, functorch) still applies: the call is a
// dispatcher call.
// ----------------------------------------------------------------------------------------------

bool eager_tensors(PyObject* const* args, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!THPVariable_CheckExact(args[i])) return false;
  return !at::impl::torch_function_mode_enabled();
}

// The GIL is released around the call (so other Python threads run meanwhile) unless x is a small CPU
// tensor: releasing and re-taking it costs about as much as the whole op on a few thousand elements.
constexpr int64_t kKeepGilNumel = int64_t(1) << 14;

bool release_gil(const at::Tensor& x) { return !x.is_cpu() || x.numel() >= kKeepGilNumel; }

bool eager_x(const at::Tensor& x) {
  if (!supported_dtype(x.scalar_type())) return false;
#ifdef RECTOK_FAST_WITH_CUDA
  return x.is_cpu() || x.is_cuda();
#else
  return x.is_cpu();
#endif
}

PyObject* adaln_modulate_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  // (x, weight, shift, scale, eps): eps a Python float or int
  if (nargs != 5 || !eager_tensors(args, 4) || !(PyFloat_Check(args[4]) || PyLong_Check(args[4]))) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  if (!eager_x(x)) Py_RETURN_NONE;
  const double eps = PyFloat_AsDouble(args[4]);
  if (eps == -1.0 && PyErr_Occurred()) return nullptr;
  at::Tensor out;
  {
    std::optional<pybind11::gil_scoped_release> no_gil;
    if (release_gil(x)) no_gil.emplace();
    out = std::get<0>(adaln_fwd_op().call(x, THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
                                          THPVariable_Unpack(args[3]), eps));
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* gated_residual_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !eager_tensors(args, 3)) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  if (!eager_x(x)) Py_RETURN_NONE;
  at::Tensor out;
  {
    std::optional<pybind11::gil_scoped_release> no_gil;
    if (release_gil(x)) no_gil.emplace();
    out = gated_fwd_op().call(x, THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]));
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef eager_methods[] = {
    {"adaln_modulate_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&adaln_modulate_eager)),
     METH_FASTCALL,
     "adaln_modulate_eager(x, weight, shift, scale, eps) -> Tensor | None: the eager fast path of "
     "rectok_fast.ops.adaln_modulate (None: not handled here, call torch.ops.rectok_fast.adaln_modulate_fwd)"},
    {"gated_residual_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&gated_residual_eager)),
     METH_FASTCALL,
     "gated_residual_eager(x, gate, y) -> Tensor | None: the eager fast path of rectok_fast.ops.gated_residual "
     "(None: not handled here, call torch.ops.rectok_fast.gated_residual_fwd)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Launch configuration the CUDA kernels use for a shape (adaln_launch.h), for Python: host-only,
// available in CPU-only builds too. Raises for an unsupported D.
pybind11::dict cuda_launch_config(const std::string& kernel, int64_t B, int64_t N, int64_t D, const std::string& dtype,
                                  bool per_token) {
  using launch::Kernel;
  TORCH_CHECK_VALUE(dtype == "float32" || dtype == "bfloat16",
                    "cuda_launch_config: dtype must be 'float32' or 'bfloat16', got '", dtype, "'");
  const std::vector<std::pair<std::string, Kernel>> kernels = {
      {"adaln_fwd", Kernel::AdalnFwd}, {"adaln_bwd", Kernel::AdalnBwd}, {"gated_fwd", Kernel::GatedFwd},
      {"gated_bwd_token", Kernel::GatedBwdToken}, {"gated_bwd_sample", Kernel::GatedBwdSample}};
  Kernel k = Kernel::AdalnFwd;
  bool found = false;
  for (const auto& kv : kernels)
    if (kv.first == kernel) k = kv.second, found = true;
  TORCH_CHECK_VALUE(found, "cuda_launch_config: kernel must be one of adaln_fwd, adaln_bwd, gated_fwd, "
                    "gated_bwd_token, gated_bwd_sample; got '", kernel, "'");
  TORCH_CHECK_VALUE(B >= 1 && N >= 1, "cuda_launch_config: B and N must be >= 1, got ", B, ", ", N);
  const int bytes = dtype == "float32" ? 4 : 2;
  const auto c = launch::row_config(k, B, N, D, bytes);
  TORCH_CHECK_VALUE(c.ok, "rectok_fast adaln (CUDA): D = ", D, " is larger than the CUDA kernels support for ",
                    dtype, " (at most ", c.max_dim, ": one row group of threads holds a row, ", c.cpt * c.elems,
                    " elements per thread)");
  pybind11::dict d;
  d["kernel"] = kernel;
  d["threads_per_row"] = c.tpr;
  d["row_groups_per_block"] = c.groups;
  d["threads_per_block"] = c.threads;
  d["elems_per_chunk"] = c.elems;
  d["vector_bytes"] = launch::kChunkBytes;
  d["chunks_per_row"] = c.chunks;
  d["chunks_per_thread"] = c.cpt;
  d["rows_per_block"] = c.rows_per_block;
  d["rows_per_group"] = c.iters;
  d["grid"] = pybind11::make_tuple(c.grid_x, c.grid_y);
  d["partial_rows"] = c.partial_rows;
  d["max_dim"] = c.max_dim;
  d["prefetch_rows"] = k == Kernel::AdalnBwd ? launch::prefetch_rows(per_token, bytes)
                     : k == Kernel::GatedBwdSample ? launch::kGatedBwdPrefetchRows : 0;
  // __launch_bounds__ of the kernel: (max threads per block, min blocks per SM; 0 = none)
  const int max_threads = launch::loops_over_rows(k) ? launch::kMaxTpr : launch::kFwdMaxTpr;
  const int min_blocks = launch::loops_over_rows(k) ? (k == Kernel::GatedBwdSample ? 1 : 0) : launch::kFwdMinBlocks;
  d["launch_bounds"] = pybind11::make_tuple(max_threads, min_blocks);
  if (launch::loops_over_rows(k)) {
    d["finish_threads_per_block"] = launch::kFinishCols * launch::kFinishSlices;
    d["finish_grid"] = launch::ceil_div(D, launch::kFinishCols);
  }
  return d;
}

bool has_cuda() {
#ifdef RECTOK_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rectok

TORCH_LIBRARY(rectok_fast, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("adaln_modulate_fwd(Tensor x, Tensor weight, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)", tags);
  m.def("adaln_modulate_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor shift, Tensor scale, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor", tags);
  m.def("gated_residual_bwd(Tensor grad_out, Tensor gate, Tensor y) -> (Tensor, Tensor)", tags);
}

// One implementation for both devices: it branches on the device itself (CUDA kernels or the CPU loops).
TORCH_LIBRARY_IMPL(rectok_fast, CPU, m) {
  m.impl("adaln_modulate_fwd", &rectok::adaln_fwd);
  m.impl("adaln_modulate_bwd", &rectok::adaln_bwd);
  m.impl("gated_residual_fwd", &rectok::gated_fwd);
  m.impl("gated_residual_bwd", &rectok::gated_bwd);
}

TORCH_LIBRARY_IMPL(rectok_fast, CUDA, m) {
  m.impl("adaln_modulate_fwd", &rectok::adaln_fwd);
  m.impl("adaln_modulate_bwd", &rectok::adaln_bwd);
  m.impl("gated_residual_fwd", &rectok::gated_fwd);
  m.impl("gated_residual_bwd", &rectok::gated_bwd);
}

TORCH_LIBRARY_IMPL(rectok_fast, Meta, m) {
  m.impl("adaln_modulate_fwd", &rectok::adaln_fwd_meta);
  m.impl("adaln_modulate_bwd", &rectok::adaln_bwd_meta);
  m.impl("gated_residual_fwd", &rectok::gated_fwd_meta);
  m.impl("gated_residual_bwd", &rectok::gated_bwd_meta);
}

TORCH_LIBRARY_IMPL(rectok_fast, Autograd, m) {
  m.impl("adaln_modulate_fwd", &rectok::adaln_fwd_autograd);
  m.impl("gated_residual_fwd", &rectok::gated_fwd_autograd);
  // The backward ops are not differentiable (no double backward): a clear error if one is asked for.
  m.impl("adaln_modulate_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("gated_residual_bwd", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rectok_fast AdaLN extension: registers torch.ops.rectok_fast.{adaln_modulate,gated_residual}_{fwd,bwd}";
  m.def("has_cuda", &rectok::has_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_launch_config", &rectok::cuda_launch_config,
        "launch configuration of a CUDA kernel for a shape (host-only; raises for an unsupported D)",
        pybind11::arg("kernel"), pybind11::arg("B"), pybind11::arg("N"), pybind11::arg("D"), pybind11::arg("dtype"),
        pybind11::arg("per_token") = false);
  m.def("set_poison_outputs", &rectok::set_poison_outputs,
        "test hook: allocate every output and scratch buffer pre-filled with NaN");
  m.def("poison_outputs", &rectok::poison_outputs);
  TORCH_CHECK(PyModule_AddFunctions(m.ptr(), rectok::eager_methods) == 0, "rectok_fast._C: cannot add the eager entries");
}
