"""The reference ops (the oracle) against hand computations with explicit loops / closed forms."""
import math

import pytest
import torch

from rectok_fast.ops import reference as ref


def test_flow_interpolate_per_sample_weights_and_velocity():
    x, n = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    t = torch.tensor([0.0, 0.25, 1.0])
    out, vel = ref.flow_interpolate(x, n, t, return_velocity=True)
    for b in range(3):
        assert torch.allclose(out[b], (1 - t[b]) * x[b] + t[b] * n[b])
    assert torch.allclose(vel, n - x)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], n[2])


def test_flow_interpolate_gives_no_gradient_to_t_and_rejects_bad_t():
    x = torch.randn(2, 4, requires_grad=True)
    t = torch.rand(2, requires_grad=True)
    ref.flow_interpolate(x, torch.randn(2, 4), t).sum().backward()
    assert t.grad is None
    assert torch.allclose(x.grad, (1 - t.detach())[:, None].expand(2, 4))
    with pytest.raises(ValueError, match="one value per sample"):
        ref.flow_interpolate(x, torch.randn(2, 4), torch.rand(3))


def test_posterior_flow_noise_matches_hand_computation_including_clamp():
    b, l, c = 2, 3, 4
    m = torch.randn(b, l, 2 * c)
    m[0, 0, c] = 50.0   # clamped to 20
    m[1, 2, c + 1] = -40.0  # clamped to -30
    e1, e2 = torch.randn(b, l, c), torch.randn(b, l, c)
    tau = torch.tensor([0.3, 0.9])
    z, z_tau, kl = ref.posterior_flow_noise(m, e1, e2, tau, gamma=0.5)
    for bi in range(b):
        acc = 0.0
        for li in range(l):
            for ci in range(c):
                mu = m[bi, li, ci].item()
                lv = min(max(m[bi, li, c + ci].item(), -30.0), 20.0)
                zz = mu + math.exp(0.5 * lv) * e1[bi, li, ci].item()
                assert z[bi, li, ci].item() == pytest.approx(zz, rel=1e-5, abs=1e-5)
                want = (1 - tau[bi].item()) * zz + tau[bi].item() * 0.5 * e2[bi, li, ci].item()
                assert z_tau[bi, li, ci].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
                acc += 0.5 * (mu * mu + math.exp(lv) - 1 - lv)
        assert kl[bi].item() == pytest.approx(acc, rel=1e-5)


def test_cosine_distill_loss_all_tokens_and_gathered():
    p, f = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    cos = [[torch.dot(p[b, n], f[b, n]) / (p[b, n].norm() * f[b, n].norm()) for n in range(5)] for b in range(2)]
    want_all = sum(1 - c for row in cos for c in row) / 10
    assert ref.cosine_distill_loss(p, f).item() == pytest.approx(want_all.item(), rel=1e-5)
    ids = torch.tensor([[4, 0], [2, 2]])
    picked = torch.stack([p[b, ids[b]] for b in range(2)])            # pred holds the picked rows only
    want_ids = sum(1 - cos[b][int(ids[b, m])] for b in range(2) for m in range(2)) / 4
    assert ref.cosine_distill_loss(picked, f, ids).item() == pytest.approx(want_ids.item(), rel=1e-5)


def test_cosine_distill_loss_empty_ids_is_zero_but_connected():
    p = torch.randn(2, 0, 6, requires_grad=True)
    loss = ref.cosine_distill_loss(p, torch.randn(2, 5, 6), torch.empty(2, 0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))


def test_cosine_distill_loss_target_gets_no_gradient():
    p = torch.randn(2, 3, 4, requires_grad=True)
    f = torch.randn(2, 3, 4, requires_grad=True)
    ref.cosine_distill_loss(p, f).backward()
    assert f.grad is None and p.grad is not None


@pytest.mark.parametrize("mod_shape", ["sample", "sample1", "token"])
def test_adaln_modulate_and_gated_residual_by_hand(mod_shape):
    b, n, d = 2, 3, 5
    x, w = torch.randn(b, n, d), torch.randn(d)
    shape = {"sample": (b, d), "sample1": (b, 1, d), "token": (b, n, d)}[mod_shape]
    shift, scale, gate, y = torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.randn(b, n, d)
    out = ref.adaln_modulate(x, w, shift, scale, eps=1e-6)
    res = ref.gated_residual(x, gate, y)
    for bi in range(b):
        for ni in range(n):
            row = x[bi, ni]
            rms = torch.sqrt((row * row).mean() + 1e-6)
            s = shift[bi] if mod_shape == "sample" else shift[bi, 0 if mod_shape == "sample1" else ni]
            k = scale[bi] if mod_shape == "sample" else scale[bi, 0 if mod_shape == "sample1" else ni]
            g = gate[bi] if mod_shape == "sample" else gate[bi, 0 if mod_shape == "sample1" else ni]
            assert torch.allclose(out[bi, ni], row / rms * w * (1 + k) + s, atol=1e-5)
            assert torch.allclose(res[bi, ni], row + g * y[bi, ni], atol=1e-6)


def test_adaln_modulate_rejects_bad_shapes_by_name():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="weight must be"):
        ref.adaln_modulate(x, torch.randn(5), torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="shift must be"):
        ref.adaln_modulate(x, torch.randn(4), torch.randn(3, 4), torch.randn(2, 4))
