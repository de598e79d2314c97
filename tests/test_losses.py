"""Tokenizer losses vs hand computations, and gradient flow through a full stage-1 step."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast.losses import RecTokLoss, build_rectok_loss, hinge_d_loss
from rectok_fast.models.discriminator import NLayerDiscriminator
from rectok_fast.models.perceptual import LPIPS, PerceptualLoss
from rectok_fast.models.teacher import build_teacher
from rectok_fast.models.tokenizer import build_tokenizer
from test_tokenizer import SECS  # not "tests.test_tokenizer": torch-fidelity installs a top-level "tests" package


class TinyClassifier(nn.Module):
    """ConvNeXt stand-in: image -> 10 logits."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 10))

    def forward(self, x):
        return self.net(x)


def small_loss(**kw) -> RecTokLoss:
    perc = PerceptualLoss(None, TinyClassifier().requires_grad_(False), convnext_size=32)
    return RecTokLoss(perc, NLayerDiscriminator(ndf=8), **kw)


def fake_out(b=2, n=16, d=8, hw=32, masked=5):
    recon = torch.rand(b, 3, hw, hw, requires_grad=True)
    pred = torch.randn(b, n, d, requires_grad=True)
    target = torch.randn(b, n, d)
    ids = torch.stack([torch.randperm(n)[:masked] for _ in range(b)]) if masked is not None else None
    return SimpleNamespace(recon=recon * 2 - 1, kl=torch.rand(b) * 100, sem_pred={"t": pred},
                           sem_target={"t": target}, ids_masked=ids, sem_mode="rec+align"), pred, target


def cos_hand(p, f):
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (1 - (p * f).sum(-1)).mean()


def test_discriminator_keys_match_official():
    got = {k: tuple(v.shape) for k, v in RecTokLoss(None).state_dict().items()}
    want = dict(SECS["disc"]) | {"logvar": ()}
    assert got == want
    assert NLayerDiscriminator()(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)


def test_hinge_by_hand():
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    want = 0.5 * ((0.5 + 0 + 2.0) / 3 + (0 + 1 + 1.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(want)


@pytest.mark.parametrize("mode", ["rec+align", "align", "reconstruction"])
def test_semantic_targets(mode):
    loss = small_loss(sem_target=mode)
    out, pred, target = fake_out()
    got = loss.sem_loss(out)
    if mode == "reconstruction":
        ids = out.ids_masked
        want = cos_hand(torch.gather(pred, 1, ids[..., None].expand(-1, -1, 8)),
                        torch.gather(target, 1, ids[..., None].expand(-1, -1, 8)))
    else:
        want = cos_hand(pred, target)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("ids", ["empty", "none"])
def test_reconstruction_target_without_masked_tokens(ids):
    loss = small_loss(sem_target="reconstruction")
    out, pred, _ = fake_out(masked=0 if ids == "empty" else None)
    val = loss.sem_loss(out)
    assert val.item() == 0.0
    val.backward()
    assert pred.grad is not None and pred.grad.abs().sum() == 0   # connected, zero gradient


def test_generator_loss_by_hand():
    torch.manual_seed(0)
    loss = small_loss(disc_start_epoch=3)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out, pred, target = fake_out()
    x01, r01 = images * 0.5 + 0.5, out.recon.detach() * 0.5 + 0.5
    mse = ((x01 - r01) ** 2).mean()
    perc = loss.perceptual_loss(x01, r01)      # only the ConvNeXt stand-in: its MSE term alone
    c = loss.perceptual_loss.convnext
    prep = lambda t: (F.interpolate(t, size=32, mode="bilinear", antialias=True) - loss.perceptual_loss.imagenet_mean) \
        / loss.perceptual_loss.imagenet_std
    torch.testing.assert_close(perc, ((c(prep(x01)) - c(prep(r01))) ** 2).mean())
    kl = out.kl.sum() / 2
    sem = cos_hand(pred, target)
    total, logs = loss.generator_loss(images, out, epoch=2)     # before the GAN starts
    torch.testing.assert_close(total, mse + perc + 1e-6 * kl + sem)
    assert logs["discriminator_factor"] == 0.0
    assert logs["psnr"].item() == pytest.approx(-10 * torch.log10(mse).item(), rel=1e-5)
    total2, logs2 = loss.generator_loss(images, out, epoch=3)
    g = -loss.discriminator(r01).mean()
    torch.testing.assert_close(total2, mse + perc + 1e-6 * kl + sem + 0.1 * g, atol=1e-5, rtol=1e-5)
    assert logs2["discriminator_factor"] == 1.0


def test_discriminator_loss_gated():
    loss = small_loss(disc_start_epoch=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    r = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    l0, _ = loss.discriminator_loss(x, r, epoch=0)
    assert l0.item() == 0.0
    l1, logs = loss.discriminator_loss(x, r, epoch=1)
    assert l1.item() > 0 and set(logs) == {"discriminator_loss", "logits_real", "logits_fake"}
    l1.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_stage_defaults():
    s1 = build_rectok_loss("tokenizer", perceptual=None)
    assert (s1.kl_weight, s1.sem_weight, s1.disc_weight, s1.disc_start_epoch, s1.perceptual_weight) == (1e-6, 1.0, 0.1, 100, 1.0)
    s2 = build_rectok_loss("decoder_ft", perceptual=None)
    assert (s2.kl_weight, s2.sem_weight, s2.disc_start_epoch) == (0.0, 0.0, 0)
    assert not s1.logvar.requires_grad and s1.logvar.item() == 0.0


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        net = LPIPS()
    with torch.no_grad():
        for k in range(5):
            getattr(net, f"lin{k}").model[1].weight.uniform_(0, 0.1)
    return net


def test_lpips_matches_direct_formula(lpips_net):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    feats = list(lpips_net.net.slice1) + list(lpips_net.net.slice2) + list(lpips_net.net.slice3) + \
        list(lpips_net.net.slice4) + list(lpips_net.net.slice5)
    taps = {3, 8, 15, 22, 29}   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features

    def levels(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(feats):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    want = torch.zeros(2)
    for k, (a, b) in enumerate(zip(levels(x), levels(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(lpips_net, f"lin{k}").model[1].weight.view(1, -1, 1, 1)
        want += ((a - b) ** 2 * w).sum(1).mean((1, 2))
    got = lpips_net(x, y)
    assert got.shape == (2, 1, 1, 1)
    torch.testing.assert_close(got.view(2), want, atol=1e-6, rtol=1e-5)
    assert lpips_net(x, x).abs().max() < 1e-6


def test_lpips_lin_weights_from_file(tmp_path, lpips_net):
    torch.save({f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 0.5) for k, c in
                enumerate((64, 128, 256, 512, 512))}, tmp_path / "vgg.pth")
    lpips_net._load_lins(str(tmp_path / "vgg.pth"))
    assert torch.all(lpips_net.lin3.model[1].weight == 0.5)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="lin1"):
        lpips_net._load_lins(str(tmp_path / "bad.pth"))


def test_full_step_gradients_reach_every_trainable_param_and_not_the_teacher():
    torch.manual_seed(0)
    random.seed(0)
    tok = build_tokenizer("rectok_tiny", mask_ratio=0.4, mask_ratio_min=0.3)   # always masks
    with pytest.warns(UserWarning):
        teacher = build_teacher("dinov3", None, img_size=64, arch="vit_small_patch16_dinov3",
                                embed_dim=64, depth=1, num_heads=2)
    tok.attach_teacher("dinov3", teacher)
    loss = small_loss(disc_start_epoch=0)
    tok.train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    assert out.ids_masked.shape[1] > 0
    total, _ = loss.generator_loss(x, out, epoch=0)
    total.backward()
    missing = [n for n, p in tok.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in loss.discriminator.parameters())   # G step leaves D alone
    assert all(p.grad is None for p in loss.perceptual_loss.parameters())
    assert not any(k.startswith("sem_foundation") or "teacher" in k for k in tok.state_dict())
    # decoder fine-tuning: only the decoder learns
    tok.zero_grad(set_to_none=True)
    tok.freeze_everything_but_decoder()
    total, _ = loss.generator_loss(x, tok(x), epoch=0)
    total.backward()
    for n, p in tok.named_parameters():
        assert (p.grad is not None) == n.startswith("decoder."), n
