"""RecTok tokenizer: official layout, RoPE, masking, noise, eval semantics and input errors."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from rectok_fast.flow import sample_tokenizer_noise_level, shift_noise_level, timestep_shift
from rectok_fast.models.rope import apply_rope, rope_table
from rectok_fast.models.tokenizer import (DepthToSpacePC, build_tokenizer, num_visible, random_masking_ids,
                                          sample_mask_ratio, unshuffle_with_mask)

# A copy of spec/official-keys-rectok.txt ships with the tests (the official model's state-dict listing).
KEYS_FILE = Path(__file__).resolve().parent / "data" / "official-keys-rectok.txt"


def official_sections() -> dict[str, dict[str, tuple]]:
    """Parse the listing into sections: main (257 keys), sem, mlp, teacher, disc."""
    secs, sec = {}, None
    for line in open(KEYS_FILE).read().splitlines():
        if line.startswith("# entries"):
            continue
        if line.startswith("#"):
            if "RecTok rectok_BB state_dict" in line:
                sec = "main"
            elif "Stage-1 only: sem_decoders" in line:
                sec = "sem"
            elif "sem_dec_type='mlp'" in line:
                sec = "mlp"
            elif "Stage-1 only: sem_foundation_models" in line:
                sec = "teacher"
            elif "Loss module" in line:
                sec = "disc"
            elif line.startswith("# per-submodule") or line.startswith("# named buffers") or line.startswith("# ---"):
                sec = None
            continue
        if sec and "\t" in line:
            key, shape, _ = line.split("\t")
            secs.setdefault(sec, {})[key] = tuple(eval(shape))
    return secs


SECS = official_sections()


def shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_listing_parsed():
    assert len(SECS["main"]) == 257 and len(SECS["sem"]) == 38 and len(SECS["mlp"]) == 4
    assert sum(math.prod(s) for s in SECS["main"].values()) == 171_970_900


@pytest.mark.parametrize("preset, extra, sections", [
    ("rectok_BB", {}, ("main", "sem")),
    ("rectok_BB", {"teachers": {}}, ("main",)),
    ("rectok_BB_decft", {}, ("main",)),
    ("rectok_BB", {"sem_dec_type": "mlp", "mask_ratio": 0.0}, ("main", "mlp")),
])
def test_state_dict_equals_official(preset, extra, sections):
    with torch.device("meta"):
        tok = build_tokenizer(preset, **extra)
    want = {}
    for s in sections:
        want.update(SECS[s])
    got = shapes(tok)
    assert set(got) == set(want), (sorted(set(got) - set(want))[:10], sorted(set(want) - set(got))[:10])
    assert got == want
    assert list(got) == list(want)          # same order as the official module
    names = {n for n, _ in tok.named_buffers()}
    assert {"encoder.rope_tensor", "decoder.rope_tensor", "mean", "std"} <= names   # non-persistent


def test_param_counts_spec():
    with torch.device("meta"):
        tok = build_tokenizer("rectok_BB")
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(tok.encoder) == 86_033_920 and n(tok.decoder) == 85_936_980
    assert n(tok.sem_decoders) == 1_606_336


# ---- RoPE ------------------------------------------------------------------------------------

def spec_angles(d: int, grid: int) -> torch.Tensor:
    """Spec 1.3 in float64: f_k = 7 (7/7e-4)^(-k/(D/4-1)); channel j < D/2 uses the row coordinate and
    f_{j mod D/4}; channel j >= D/2 the column coordinate and f_{(j - D/2) mod D/4}."""
    q = d // 4
    f = [7.0 * (7.0 / 7e-4) ** (-k / (q - 1)) for k in range(q)]
    ang = torch.zeros(grid * grid, d, dtype=torch.float64)
    for i in range(grid):
        for j in range(grid):
            t = i * grid + j
            for c in range(d):
                coord = i / (grid - 1) if c < d // 2 else j / (grid - 1)
                ang[t, c] = 2 * math.pi * coord * f[c % q]
    return ang


@pytest.mark.parametrize("d", [48, 64])
def test_rope_table_matches_spec(d):
    table = rope_table(d, 16, 16)
    assert table.shape == (1, 256, 2 * d) and table.dtype == torch.float32
    ang = spec_angles(d, 16)
    torch.testing.assert_close(table[0, :, :d].double(), ang.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(table[0, :, d:].double(), ang.sin(), atol=2e-5, rtol=0)


def test_rope_application_and_non_orthogonal_quirk():
    d = 64
    table = rope_table(d, 16, 16)
    x = torch.randn(2, 3, 256, d)
    y = apply_rope(x, table)
    cos, sin = table[0, :, :d], table[0, :, d:]
    # explicit per-channel formula: pair (2m, 2m+1) -> (x_{2m} cos_{2m} - x_{2m+1} sin_{2m}, x_{2m+1} cos_{2m+1} + x_{2m} sin_{2m+1})
    e, o = x[..., 0::2], x[..., 1::2]
    want = torch.empty_like(x)
    want[..., 0::2] = e * cos[:, 0::2] - o * sin[:, 0::2]
    want[..., 1::2] = o * cos[:, 1::2] + e * sin[:, 1::2]
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    # the quirk: paired channels carry different angles, so norms are not preserved
    ratio = y.norm(dim=-1) / x.norm(dim=-1)
    assert (ratio - 1).abs().max() > 1e-3
    assert not torch.allclose(cos[:, 0::2], cos[:, 1::2])
    # token 0 (row 0, col 0) is the identity
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


# ---- masking -----------------------------------------------------------------------------------

def test_mask_ratio_distribution():
    rng = random.Random(0)
    rs = [sample_mask_ratio(0.4, -0.1, True, rng) for _ in range(20000)]
    p0 = sum(r == 0 for r in rs) / len(rs)
    assert abs(p0 - 0.2) < 0.015
    assert max(rs) <= 0.4 and min(rs) >= 0
    ls = [num_visible(256, r) for r in rs]
    assert min(ls) >= 154 and max(ls) == 256
    assert num_visible(256, 0.4) == 154 and num_visible(256, 0.0) == 256
    assert sample_mask_ratio(0.3, -0.1, False, rng) == 0.3


def test_masking_ids_invariants():
    g = torch.Generator().manual_seed(0)
    b, n, l = 3, 256, 170
    ids = random_masking_ids(b, n, l, generator=g)
    assert ids.ids_keep.shape == (b, l) and ids.ids_masked.shape == (b, n - l)
    shuffle = torch.cat([ids.ids_keep, ids.ids_masked], 1)
    assert torch.equal(torch.gather(shuffle, 1, ids.ids_restore), torch.arange(n).expand(b, n))
    for i in range(b):
        assert sorted(shuffle[i].tolist()) == list(range(n))            # partition
        assert not torch.equal(ids.ids_keep[i], ids.ids_keep[i].sort().values)   # shuffled, not sorted
    # unshuffle: position i holds the fill vector iff ids_restore >= L, else its own visible token
    x = torch.randn(b, n, 4)
    vis = torch.gather(x, 1, ids.ids_keep[..., None].expand(-1, -1, 4))
    fill = torch.full((1, 1, 4), 7.0)
    full = unshuffle_with_mask(vis, fill, ids.ids_restore)
    masked = ids.ids_restore >= l
    assert torch.equal(full[~masked], x[~masked])
    assert (full[masked] == 7.0).all()


def test_encoder_masks_only_in_training():
    random.seed(3)
    tok = build_tokenizer("rectok_tiny", teachers={}, mask_ratio=0.4, mask_ratio_min=0.3)   # r in [0.3, 0.4]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok.train()
    out = tok(x)
    n = 16
    assert out.ids_masked is not None and out.z.shape[1] + out.ids_masked.shape[1] == n
    assert out.z.shape[1] in (num_visible(n, 0.3), num_visible(n, 0.4), 11, 12) and out.kl.shape == (2,)
    assert out.recon.shape == x.shape
    assert tok.encode_moments(x).shape == (2, n, 32)        # never masked
    tok.eval()
    out = tok(x)
    assert out.ids_masked is None and out.ids_restore is None and out.z.shape[1] == n


# ---- noise levels ------------------------------------------------------------------------------

def test_noise_levels_closed_form():
    s = timestep_shift(16, 16, 128)
    assert s == pytest.approx(math.sqrt(8))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    tau = sample_tokenizer_noise_level(4096, "shift", s, generator=g1)
    u = torch.rand(4096, generator=g2)
    torch.testing.assert_close(tau, s * u / (1 + (s - 1) * u))
    # median of the shifted law: u = 1/2 -> s / (s + 1) ~ 0.739
    assert tau.median().item() == pytest.approx(s / (s + 1), abs=0.03)
    assert shift_noise_level(torch.tensor([0.0, 1.0]), s).tolist() == [0.0, 1.0]
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    torch.testing.assert_close(sample_tokenizer_noise_level(64, "lognorm", generator=g1),
                               torch.sigmoid(torch.randn(64, generator=g2)))


def test_training_forward_flow_noise_chain():
    """z_tau = (1 - tau) z + tau eps with the official draw order (mask, eps_post, tau, eps_flow)."""
    tok = build_tokenizer("rectok_tiny", teachers={}, mask_ratio=0.0)
    tok.train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.manual_seed(5)
    out = tok(x)
    moments = tok.encode_moments(x).detach()
    torch.manual_seed(5)
    eps_post = torch.randn(2, 16, 16)
    u = torch.rand(2)
    eps_flow = torch.randn(2, 16, 16)
    tau = tok.timestep_shift * u / (1 + (tok.timestep_shift - 1) * u)
    mean, logvar = moments[..., :16], moments[..., 16:].clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * eps_post
    torch.testing.assert_close(out.tau, tau)
    torch.testing.assert_close(out.z, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.z_tau, (1 - tau[:, None, None]) * z + tau[:, None, None] * eps_flow,
                               atol=1e-5, rtol=1e-5)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2))
    torch.testing.assert_close(out.kl, kl, atol=1e-4, rtol=1e-5)


# ---- decoder head / eval semantics --------------------------------------------------------------

def test_depth_to_space_order():
    p, h, w = 4, 2, 3
    x = torch.arange(p * p * 3 * h * w, dtype=torch.float32).view(1, p * p * 3, h, w)
    y = DepthToSpacePC(p)(x)
    for (p1, p2, c, i, j) in [(0, 0, 0, 0, 0), (1, 2, 1, 1, 2), (3, 3, 2, 1, 0), (2, 0, 1, 0, 1)]:
        assert y[0, c, i * p + p1, j * p + p2] == x[0, (p1 * p + p2) * 3 + c, i, j]


def test_eval_paths_use_posterior_mean_and_stats():
    torch.manual_seed(0)
    tok = build_tokenizer("rectok_tiny", teachers={}).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean_c = torch.randn(16) * 0.1
    std_c = torch.rand(16) + 0.5
    tok.set_latent_stats(mean_c, std_c)
    assert "mean" not in tok.state_dict() and tok.mean.shape == (1, 1, 16)
    moments = tok.encode_moments(x)
    z = tok.tokenize(x)
    want = ((moments[..., :16] - mean_c) / std_c).transpose(1, 2).reshape(2, 16, 4, 4)
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.latents_from_moments(moments, sample=False), want, atol=1e-5, rtol=1e-5)
    rec = tok.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    torch.testing.assert_close(rec, (tok.decoder(moments[..., :16]) * 0.5 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.detokenize(z), rec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok(x).recon * 0.5 + 0.5, tok.decoder(moments[..., :16]) * 0.5 + 0.5)
    g = torch.Generator().manual_seed(0)
    s1 = tok.latents_from_moments(moments, generator=g)
    assert not torch.allclose(s1, want)


def test_input_errors():
    tok = build_tokenizer("rectok_tiny", teachers={}).eval()
    with pytest.raises(ValueError, match="64x64"):
        tok(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        tok(torch.zeros(1, 4, 64, 64))
    with pytest.raises(TypeError, match="floating point"):
        tok(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latents must be"):
        tok.detokenize(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("rectok_XL")
    with pytest.raises(TypeError, match="unknown tokenizer option"):
        build_tokenizer("rectok_tiny", tokn_channels=3)
    with pytest.raises(ValueError, match="channels"):
        tok.set_latent_stats(torch.zeros(3), torch.ones(3))


def test_training_needs_teacher():
    tok = build_tokenizer("rectok_tiny").train()
    with pytest.raises(RuntimeError, match="attach_teacher"):
        tok(torch.zeros(1, 3, 64, 64))


def test_freeze_everything_but_decoder():
    tok = build_tokenizer("rectok_tiny")
    tok.freeze_everything_but_decoder()
    for name, p in tok.named_parameters():
        assert p.requires_grad == name.startswith("decoder."), name


def test_official_init():
    torch.manual_seed(0)
    tok = build_tokenizer("rectok_tiny", encoder_size="base", teachers={"dinov3": 64})
    w = tok.encoder.transformer[0].attn.qkv.weight
    # trunc_normal_ bounds are absolute (+-2), so with std 0.02 it is effectively untruncated
    assert w.std().item() == pytest.approx(0.02, rel=0.02) and w.abs().max() > 0.04
    assert tok.encoder.transformer[0].attn.qkv.bias.abs().sum() == 0
    assert tok.decoder.conv_out.bias.abs().sum() == 0
    assert torch.all(tok.encoder.ln_pre.weight == 1)
    assert tok.encoder.positional_embedding.std().item() == pytest.approx(768 ** -0.5, rel=0.02)
    assert torch.all(tok.sem_decoders["dinov3"].mask_embedding == 0)
    # semantic decoder keeps PyTorch's default (kaiming-uniform) init, not trunc-normal 0.02
    assert tok.sem_decoders["dinov3"].token_embedding.bias.abs().sum() > 0
