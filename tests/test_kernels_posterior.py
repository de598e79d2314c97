"""Triton posterior_flow_noise (kernels/posterior_flow.py) against the reference and an fp64 oracle.

Covers z, z_tau, the per-sample KL and every gradient (moments through mean and the clamped logvar,
eps_post, eps_flow), fp32 and bf16, odd sizes, distinct per-sample tau, logvar values on and beyond
the clamp bounds, and non-contiguous inputs. Launcher outputs start as NaN (poison_outputs).
"""
from __future__ import annotations

import pytest
import torch

import rectok_fast.kernels.posterior_flow as post_mod
from _kernel_checks import via_custom_op, as64, check, grads, kernel_device, leaf, poison_outputs  # noqa: F401
from rectok_fast import ops
from rectok_fast.kernels.posterior_flow import posterior_flow_noise as fused_post
from rectok_fast.ops import reference

DTYPES = [torch.float32, torch.bfloat16]


def _oracle(moments, e1, e2, tau, gamma):
    c = moments.shape[-1] // 2
    mean, logvar = moments[..., :c], moments[..., c:].clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * e1
    t = tau.detach().double().reshape(-1, 1, 1)
    z_tau = (1 - t) * z + t * gamma * e2
    kl = 0.5 * (mean ** 2 + torch.exp(logvar) - 1 - logvar).sum(dim=(1, 2))
    return z, z_tau, kl


def _moments(B, L, C, dtype, dev, clamp_cases=True):
    m = torch.randn(B, L, 2 * C, device=dev)
    m[..., C:] = m[..., C:] * 1.5 - 0.5               # logvar spread around 0
    if clamp_cases and L >= 2 and C >= 2:             # on and beyond both clamp bounds
        m[0, 0, C] = -30.0
        m[0, 0, C + 1] = 20.0
        m[-1, 1, C] = -31.5
        m[-1, 1, C + 1] = 21.0
    return m.to(dtype)


def _run_case(moments, e1, e2, tau, gamma, via="direct", seed_mask=(True, True, True)):
    dtype = moments.dtype
    if via == "direct":
        fused = fused_post(moments, e1, e2, tau, gamma)
    else:
        with ops.use_backend("fused"):
            fused = ops.posterior_flow_noise(moments, e1, e2, tau, gamma)
    ref = reference.posterior_flow_noise(moments, e1, e2, tau, gamma)
    m64, e164, e264 = as64([moments, e1, e2])
    ora = _oracle(m64, e164, e264, tau, gamma)
    for name, a, b, c in zip(("z", "z_tau", "kl"), fused, ref, ora):
        assert a.dtype == torch.float32
        check(name, a, b, c, dtype, atol_rel=1e-6)
    assert not torch.equal(fused[1][0], fused[1][1]), "distinct tau must give distinct z_tau"
    seeds = [torch.randn(o.shape, device=o.device) if keep else None for o, keep in zip(ref, seed_mask)]
    inputs = [moments, e1, e2]
    gf, gr, go = grads(fused, inputs, seeds), grads(ref, inputs, seeds), grads(ora, [m64, e164, e264], seeds)
    for name, a, b, c, inp in zip(("grad_moments", "grad_eps_post", "grad_eps_flow"), gf, gr, go, inputs):
        if a is not None:
            assert a.dtype == inp.dtype
        check(name, a, b, c, inp.dtype)
    return gf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 19, 33), (2, 3, 1030)])
@pytest.mark.parametrize("via", ["direct", "ops", "customop"])
def test_forward_and_grads(device, dtype, shape, via, monkeypatch):
    via = via_custom_op(via, monkeypatch)
    dev = kernel_device(device)
    B, L, C = shape
    moments = leaf(_moments(B, L, C, dtype, dev))
    e1 = leaf(torch.randn(B, L, C, device=dev).to(dtype))
    e2 = leaf(torch.randn(B, L, C, device=dev).to(dtype))
    tau = torch.tensor([0.74, 0.2, 0.5][:B], device=dev)
    _run_case(moments, e1, e2, tau, 0.7 if via == "direct" else 1.0, via)


def test_clamp_gradient_matches_torch_clamp(device):
    """Zero logvar gradient on and beyond the clamp bounds (torch.clamp passes none there), nonzero inside."""
    dev = kernel_device(device)
    B, L, C = 2, 3, 4
    moments = _moments(B, L, C, torch.float32, dev)
    moments[1, 2, C + 2] = -29.0                      # inside, far from zero variance
    moments = leaf(moments)
    e1, e2 = torch.randn(B, L, C, device=dev), torch.randn(B, L, C, device=dev)
    gm = _run_case(moments, e1, e2, torch.tensor([0.3, 0.9], device=dev), 1.0)[0]
    assert gm[0, 0, C] == 0 and gm[0, 0, C + 1] == 0 and gm[-1, 1, C] == 0 and gm[-1, 1, C + 1] == 0
    assert gm[1, 2, C + 2] != 0 and (gm[..., :C] != 0).all()


@pytest.mark.parametrize("seed_mask", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_output_gradient_alone(device, seed_mask):
    dev = kernel_device(device)
    B, L, C = 2, 5, 6
    moments = leaf(_moments(B, L, C, torch.float32, dev))
    e1, e2 = leaf(torch.randn(B, L, C, device=dev)), leaf(torch.randn(B, L, C, device=dev))
    _run_case(moments, e1, e2, torch.tensor([0.6, 0.1], device=dev), 1.3, seed_mask=seed_mask)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_partial_input_grads(device, need):
    dev = kernel_device(device)
    B, L, C = 2, 4, 3
    moments = leaf(_moments(B, L, C, torch.bfloat16, dev), need[0])
    e1 = leaf(torch.randn(B, L, C, device=dev), need[1])                  # eps in fp32 with bf16 moments
    e2 = leaf(torch.randn(B, L, C, device=dev).bfloat16(), need[2])
    _run_case(moments, e1, e2, torch.tensor([0.45, 0.95], device=dev), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    dev = kernel_device(device)
    B, L, C = 3, 6, 5
    big = leaf(torch.randn(B, 2 * C + 3, L, device=dev).to(dtype))
    moments = big.transpose(1, 2)[..., 1:2 * C + 1]                       # (B, L, 2C), strided
    e1 = leaf(torch.randn(L, B, C, device=dev).to(dtype)).transpose(0, 1)
    e2 = leaf(torch.randn(B, L, 2 * C, device=dev).to(dtype))[..., ::2]
    tau = torch.rand(B, 3, device=dev)[:, 2]
    assert not (moments.is_contiguous() or e1.is_contiguous() or e2.is_contiguous() or tau.is_contiguous())
    _run_case(moments, e1, e2, tau, 0.8)


@pytest.mark.parametrize("kl_tile", [2048, 4])
def test_multi_tile_kl_partials(device, monkeypatch, kl_tile):
    """Several L- and C-tiles per sample: the KL partial sums must all be written and added, by the last
    program of the forward (kl_tile 4: in several passes over samples and partials); it leaves the
    shared ticket counter at zero for the next launch."""
    from rectok_fast.kernels import _launch
    dev = kernel_device(device)
    monkeypatch.setattr(post_mod, "_settings", lambda L, C: (2, 4, 1))
    monkeypatch.setattr(post_mod, "KL_TILE", kl_tile)
    B, L, C = 2, 7, 9
    for clamp_cases in (True, False):     # without the clamp cases no exp(20) term hides a lost partial
        moments = leaf(_moments(B, L, C, torch.float32, dev, clamp_cases=clamp_cases))
        e1, e2 = leaf(torch.randn(B, L, C, device=dev)), leaf(torch.randn(B, L, C, device=dev))
        _run_case(moments, e1, e2, torch.tensor([0.35, 0.85], device=dev), 1.0)
        assert int(_launch.ticket_counter(moments.device)) == 0


def test_tau_gets_no_gradient(device):
    dev = kernel_device(device)
    moments = leaf(_moments(2, 3, 4, torch.float32, dev))
    tau = torch.tensor([0.2, 0.7], device=dev, requires_grad=True)
    z, zt, kl = fused_post(moments, torch.randn(2, 3, 4, device=dev), torch.randn(2, 3, 4, device=dev), tau)
    (zt.sum() + kl.sum()).backward()
    assert tau.grad is None and moments.grad is not None


def test_input_errors(device):
    dev = kernel_device(device)
    e = torch.randn(2, 3, 4, device=dev)
    with pytest.raises(ValueError, match=r"\(B, L, 2C\)"):
        fused_post(torch.randn(2, 3, 7, device=dev), e, e, torch.rand(2, device=dev))
    with pytest.raises(ValueError, match="eps_flow must be"):
        fused_post(torch.randn(2, 3, 8, device=dev), e, e[:, :2], torch.rand(2, device=dev))
    with pytest.raises(ValueError, match="one value per sample"):
        fused_post(torch.randn(2, 3, 8, device=dev), e, e, torch.rand(3, device=dev))
    with pytest.raises(TypeError, match="dtype"):
        fused_post(torch.randn(2, 3, 8, device=dev).int(), e, e, torch.rand(2, device=dev))


@pytest.mark.parametrize("via", ["direct", "customop"])
def test_unused_outputs_send_no_gradient_buffers(device, via, monkeypatch):
    """Training uses z_tau and kl, not z: the backward gets g_z = None (no zero tensor is materialized
    or read) and still matches the reference; with no used output at all nothing is launched."""
    via_custom_op(via, monkeypatch)
    dev = kernel_device(device)
    seen = []
    real_bwd = post_mod.posterior_bwd

    def spy(moments, eps_post, tau, g_z, g_zt, g_kl, *rest, **kw):
        seen.append((g_z is None, g_zt is None, g_kl is None))
        return real_bwd(moments, eps_post, tau, g_z, g_zt, g_kl, *rest, **kw)
    monkeypatch.setattr(post_mod, "posterior_bwd", spy)
    B, L, C = 2, 5, 7
    moments = leaf(_moments(B, L, C, torch.float32, dev))
    e1, e2 = torch.randn(B, L, C, device=dev), torch.randn(B, L, C, device=dev)
    tau = torch.tensor([0.3, 0.8], device=dev)
    gf = _run_case(moments, e1, e2, tau, 1.0, seed_mask=(False, True, True))
    assert gf[0] is not None and torch.isfinite(gf[0]).all()
    _run_case(moments, e1, e2, tau, 1.0, seed_mask=(False, True, False))
    if via == "direct":      # the custom-op path runs the launcher inside the registered op (no spy there)
        assert seen == [(True, False, False), (True, False, True)], seen


# ------------------------------------------------------------------------- in-kernel Philox noise (opt-in)
def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / 2 ** 0.5))


def _ks(sample):
    """Kolmogorov-Smirnov statistic of ``sample`` against N(0, 1)."""
    x, _ = sample.double().flatten().sort()
    n = x.numel()
    cdf = _normal_cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def test_philox_noise_is_standard_normal_and_independent(device):
    """mean = 0, logvar = 0, tau = 1: z is eps_post and z_tau is eps_flow. Both pass mean / variance /
    KS tests at the 1e-3-ish level on 2 x 16384 draws, are uncorrelated, and the seed decides them."""
    dev = kernel_device(device)
    B, L, C = 2, 64, 128
    moments = torch.zeros(B, L, 2 * C, device=dev)
    tau = torch.ones(B, device=dev)
    z, zt, kl = post_mod.posterior_flow_noise_philox(moments, tau, 1.0, seed=1234)
    n = z.numel()
    for name, e in (("eps_post", z), ("eps_flow", zt)):
        e = e.double().cpu()
        assert abs(e.mean().item()) < 4.5 / n ** 0.5, name
        assert abs(e.var().item() - 1) < 5 * (2 / n) ** 0.5, name
        assert _ks(e) < 1.95 / n ** 0.5, f"{name}: KS {_ks(e):.4f}"            # alpha ~ 0.001
        assert not torch.equal(e[0], e[1]), f"{name}: samples of the batch must differ"
    corr = torch.corrcoef(torch.stack([z.flatten(), zt.flatten()]).double().cpu())[0, 1].item()
    assert abs(corr) < 4.5 / n ** 0.5
    torch.testing.assert_close(kl, torch.zeros(B, device=dev))
    again = post_mod.posterior_flow_noise_philox(moments, tau, 1.0, seed=1234)[0]
    other = post_mod.posterior_flow_noise_philox(moments, tau, 1.0, seed=1235)[0]
    assert torch.equal(again, z) and not torch.equal(other, z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_philox_path_matches_the_reference_on_its_own_draws(device, dtype):
    """Recover the kernel's eps from its outputs; the reference with those eps gives the same outputs and
    the same moments gradient (the backward regenerated exactly the forward's eps_post)."""
    dev = kernel_device(device)
    B, L, C = 2, 9, 17
    moments = leaf(_moments(B, L, C, dtype, dev, clamp_cases=False))
    tau = torch.tensor([0.3, 0.9], device=dev)
    gamma = 0.8
    z, zt, kl = post_mod.posterior_flow_noise_philox(moments, tau, gamma, seed=7)
    m = moments.detach().double()
    mean, std = m[..., :C], torch.exp(0.5 * m[..., C:].clamp(-30, 20))
    t = tau.double().view(B, 1, 1)
    e1 = ((z.detach().double() - mean) / std).float()
    e2 = ((zt.detach().double() - (1 - t) * z.detach().double()) / (t * gamma)).float()
    ref = reference.posterior_flow_noise(moments, e1, e2, tau, gamma)
    for a, b in zip((z, zt, kl), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    seeds = [None, torch.randn(B, L, C, device=dev), torch.randn(B, device=dev)]   # training: z unused
    g_f = grads([z, zt, kl], [moments], seeds)[0]
    g_r = grads(list(ref), [moments], seeds)[0]
    torch.testing.assert_close(g_f.float(), g_r.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_philox_seed_errors(device):
    dev = kernel_device(device)
    m = torch.zeros(2, 3, 4, device=dev)
    with pytest.raises(ValueError, match="seed"):
        post_mod.posterior_flow_noise_philox(m, torch.ones(2, device=dev), 1.0, seed=-1)
