"""DiT transport (T_IS_DATA), training loss, Euler time grid, CFG / AutoGuidance and the sampler."""
from __future__ import annotations

import math

import pytest
import torch

from rectok_fast import flow, ops
from rectok_fast.models.dit import build_dit

def tiny(seed=0, **kw):
    """The registered tiny DiT^DH (one encoder block, 8 latent channels), random weights."""
    model = build_dit("ditdh_tiny", **{"depth": 1, "in_channels": 8, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


class LabelVelocity(torch.nn.Module):
    """Stub generator: v = a * x + y + 100 * t, so every input's effect is visible in the output."""

    num_classes = 10
    latent_shape = (2, 3, 3)

    def __init__(self, a=1.0):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a)))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.a * x + y.float().view(-1, 1, 1, 1) + 100 * t.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# conventions and time sampling


def test_conventions_are_named_and_distinct():
    assert "noise" in flow.TAU_IS_NOISE and "data" in flow.T_IS_DATA
    assert flow.dit_time_shift(16, 16, 128) == pytest.approx(math.sqrt(8))
    assert flow.dit_time_shift(32, 32, 32) == pytest.approx(math.sqrt(8))


def test_sample_dit_time_closed_form():
    s = 2.5
    t = flow.sample_dit_time(1000, s, generator=torch.Generator().manual_seed(3))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, 1 - s * u / (1 + (s - 1) * u))
    assert t.shape == (1000,) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    assert t.median() < 0.5                    # shift > 1 skews DiT time towards noise (t = 0)
    torch.testing.assert_close(flow.sample_dit_time(5, 1.0, generator=torch.Generator().manual_seed(1)),
                               1 - torch.rand(5, generator=torch.Generator().manual_seed(1)))


def test_existing_tokenizer_api_unchanged():
    tau = flow.sample_tokenizer_noise_level(4, "shift", 2.0, generator=torch.Generator().manual_seed(0))
    u = torch.rand(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tau, 2 * u / (1 + u))
    assert flow.timestep_shift(16, 16, 128) == pytest.approx(math.sqrt(8))


def test_euler_time_grid_closed_form():
    n, s = 150, math.sqrt(8)
    grid = flow.euler_time_grid(n, s)
    assert grid.shape == (n,) and grid[0] == 0 and grid[-1] == 1
    for i in range(n):
        g = (n - 1 - i) / (n - 1)
        assert grid[i].item() == pytest.approx(1 - s * g / (1 + (s - 1) * g), abs=1e-6)
    steps = grid.diff()
    assert (steps > 0).all() and (steps.diff() > 0).all()       # fine near noise, coarse near data
    assert steps[0].item() == pytest.approx(0.00238, abs=1e-4)
    assert steps[-1].item() == pytest.approx(0.01875, abs=1e-4)
    with pytest.raises(ValueError, match="grid points"):
        flow.euler_time_grid(1, s)


# ---------------------------------------------------------------------------------------------------
# transport and loss


def test_transport_path_by_hand():
    x0, x1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt, u = flow.transport_path(x0, x1, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, tt * x1 + (1 - tt) * x0)
    torch.testing.assert_close(u, x1 - x0)
    torch.testing.assert_close(xt[2], x1[2])                   # t = 1 is data
    torch.testing.assert_close(xt[0], x0[0])


def test_training_loss_by_hand_and_through_ops(monkeypatch):
    seen = []
    real = ops.flow_interpolate

    def spy(x, noise, t, return_velocity=False):
        seen.append(return_velocity)
        return real(x, noise, t, return_velocity=return_velocity)

    monkeypatch.setattr(ops, "flow_interpolate", spy)
    model = LabelVelocity(a=0.5)
    x1, y, s = torch.randn(3, 2, 3, 3), torch.tensor([1, 4, 10]), 2.0
    loss = flow.dit_training_loss(model, x1, y, s, generator=torch.Generator().manual_seed(7))
    assert seen == [True]

    g = torch.Generator().manual_seed(7)
    u = torch.rand(3, generator=g)
    t = 1 - s * u / (1 + (s - 1) * u)
    x0 = torch.randn(x1.shape, generator=g)
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x1 + (1 - tt) * x0
    v = 0.5 * xt + y.float().view(-1, 1, 1, 1) + 100 * tt
    per_sample = [((v[b] - (x1[b] - x0[b])) ** 2).mean() for b in range(3)]
    assert loss.item() == pytest.approx(sum(per_sample).item() / 3, rel=1e-5)
    loss.backward()
    assert model.a.grad is not None and model.a.grad != 0


def test_velocity_mse_shape_error():
    with pytest.raises(ValueError, match="differ in shape"):
        flow.velocity_mse(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------
# guidance rules


def test_cfg_doubles_batch_with_null_label_and_combines():
    model = LabelVelocity()
    x, t, y = torch.randn(2, 2, 3, 3), torch.full((2,), 0.4), torch.tensor([3, 5])
    v = flow.guided_velocity(model, x, t, y, "cfg", scale=1.5)
    (xin, tin, yin), = model.calls
    assert torch.equal(xin, torch.cat([x, x])) and torch.equal(yin, torch.tensor([3, 5, 10, 10]))
    cond = x + y.float().view(-1, 1, 1, 1) + 40
    uncond = x + 10 + 40
    torch.testing.assert_close(v, uncond + 1.5 * (cond - uncond))


def test_autoguidance_uses_same_labels_and_combines():
    main, guide = LabelVelocity(a=2.0), LabelVelocity(a=-1.0)
    x, t, y = torch.randn(2, 2, 3, 3), torch.full((2,), 0.7), torch.tensor([3, 5])
    v = flow.guided_velocity(main, x, t, y, "autoguidance", scale=1.29, guide_model=guide)
    assert torch.equal(guide.calls[0][2], y) and torch.equal(main.calls[0][2], y)
    vm = 2 * x + y.float().view(-1, 1, 1, 1) + 70
    vg = -x + y.float().view(-1, 1, 1, 1) + 70
    torch.testing.assert_close(v, vg + 1.29 * (vm - vg))
    torch.testing.assert_close(flow.autoguidance_combine(vm, vg, 1.0), vm)
    torch.testing.assert_close(flow.cfg_combine(vm, vg, 0.0), vg)


def test_guidance_interval_falls_back_to_conditional():
    model = LabelVelocity()
    x, y = torch.randn(2, 2, 3, 3), torch.tensor([3, 5])
    outside = flow.guided_velocity(model, x, torch.full((2,), 0.9), y, "cfg", 4.0, interval=(0.0, 0.5))
    torch.testing.assert_close(outside, model(x, torch.full((2,), 0.9), y))
    inside = flow.guided_velocity(model, x, torch.full((2,), 0.2), y, "cfg", 4.0, interval=(0.0, 0.5))
    assert not torch.allclose(inside, model(x, torch.full((2,), 0.2), y))


# ---------------------------------------------------------------------------------------------------
# sampler


def _manual_euler(velocity, x, n, s):
    for i in range(n - 1):
        gi = (n - 1 - i) / (n - 1)
        gj = (n - 2 - i) / (n - 1)
        ti, tj = 1 - s * gi / (1 + (s - 1) * gi), 1 - s * gj / (1 + (s - 1) * gj)
        x = x + (tj - ti) * velocity(x, torch.full((x.shape[0],), ti))
    return x


def test_euler_sampler_matches_manual_loop_on_small_model():
    model = tiny()
    y, noise, n, s = torch.tensor([1, 9]), torch.randn(2, 8, 4, 4), 4, 1.7
    out = flow.sample_latents(model, y, num_steps=n, shift=s, noise=noise)
    with torch.no_grad():
        want = _manual_euler(lambda x, t: model(x, t, y), noise, n, s)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_cfg_sampler_matches_official_doubled_batch_loop():
    model = tiny()
    y, noise, n, s, w = torch.tensor([1, 9]), torch.randn(2, 8, 4, 4), 4, 2.0, 3.0
    out = flow.sample_latents(model, y, num_steps=n, shift=s, guidance="cfg", scale=w, noise=noise)

    def official_cfg(z, t):           # carries both halves of the doubled batch, as forward_with_cfg
        yy = torch.cat([y, torch.full_like(y, 10)])
        v = model(z, t, yy)                      # t already covers the doubled batch
        c, u = v.chunk(2)
        half = u + w * (c - u)
        return torch.cat([half, half])
    with torch.no_grad():
        want = _manual_euler(official_cfg, torch.cat([noise, noise]), n, s)[:2]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_autoguidance_sampler_matches_manual_loop():
    main, guide = tiny(seed=0), tiny(seed=1)
    y, noise, n, s, w = torch.tensor([2, 3]), torch.randn(2, 8, 4, 4), 3, 2.0, 1.29
    out = flow.sample_latents(main, y, num_steps=n, shift=s, guidance="autoguidance", scale=w,
                              guide_model=guide, noise=noise)
    with torch.no_grad():
        want = _manual_euler(lambda x, t: guide(x, t, y) + w * (main(x, t, y) - guide(x, t, y)), noise, n, s)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_sampler_default_shift_and_seed_repeatability():
    model = tiny()
    y = torch.tensor([1, 2, 3])
    a = flow.sample_latents(model, y, num_steps=3, generator=torch.Generator().manual_seed(5))
    b = flow.sample_latents(model, y, num_steps=3, generator=torch.Generator().manual_seed(5))
    c = flow.sample_latents(model, y, num_steps=3, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 8, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn((3, 8, 4, 4), generator=torch.Generator().manual_seed(5))
    d = flow.sample_latents(model, y, num_steps=3, shift=flow.dit_time_shift(4, 4, 8), noise=noise)
    torch.testing.assert_close(a, d)


def test_guidance_scale_one_equals_no_guidance():
    model = tiny()
    y, noise = torch.tensor([1, 2]), torch.randn(2, 8, 4, 4)
    plain = flow.sample_latents(model, y, num_steps=3, noise=noise)
    torch.testing.assert_close(flow.sample_latents(model, y, num_steps=3, guidance="cfg", scale=1.0, noise=noise), plain)


def test_bf16_autocast_sampling_on_cpu_when_asked():
    model = tiny()
    y, noise = torch.tensor([1, 2]), torch.randn(2, 8, 4, 4)
    out = flow.sample_latents(model, y, num_steps=3, noise=noise, autocast=True)
    ref = flow.sample_latents(model, y, num_steps=3, noise=noise)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_sampler_errors_are_clear():
    model = tiny()
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown guidance 'foo'"):
        flow.sample_latents(model, y, num_steps=3, guidance="foo")
    with pytest.raises(ValueError, match="needs guide_model"):
        flow.sample_latents(model, y, num_steps=3, guidance="autoguidance", scale=1.5)
    with pytest.raises(ValueError, match="guide_model latent shape"):
        flow.sample_latents(model, y, num_steps=3, guidance="autoguidance", scale=1.5,
                            guide_model=tiny(in_channels=4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        flow.sample_latents(model, torch.tensor([11]), num_steps=3)
    with pytest.raises(ValueError, match="noise must be"):
        flow.sample_latents(model, y, num_steps=3, noise=torch.randn(2, 8, 5, 5))
