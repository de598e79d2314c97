"""An independent check of the training RECIPE against the official code (github.com/Shi-qingyu/RecTok,
commit ee87aaf). tests/data/official_train_step_{tokenizer,dit}.pt freeze two steps of the official loops
(utils/train_utils.py ``train_one_epoch_tokenizer`` with the discriminator on, ``train_one_epoch_generator``),
run on small official models with the official loss module, optimizer builder (AdamW groups and
weight-decay exclusions, betas), LR schedule, gradient clipping and EMA; see
tests/data/make_official_fixtures.py (``--only train_step``), which regenerates them from a checkout.

Here OUR STAGES run the step: TokenizerStage / DiTStage are built in-process (``build_stage`` with
``RunContext.local``) from a RunConfig resolved by ``parse_config`` with ``--preset official``, so every
recipe value the fixture does not override (its 'fixture_overrides' are passed as flags) is our stage
default; the initial weights, the frozen tokenizer and the latent statistics reach the stages as files
(--load_from, --tokenizer_ckpt, --latent_stats); the LR comes from ``lr_at(cfg.schedule, step / spe)`` and
``stage.train_step`` does the rest (loss composition, optimizer groups, clipping, EMA, discriminator).
The test substitutes only the frozen nets' fixture-sized ARCHITECTURES (teacher, narrow VGG/ConvNeXt,
whose weights it loads; the official run used the same) and the model sizes (registry overrides). The
stages see the same batches and the SAME random draws (mask ratio, mask noise, posterior eps, noise
level, flow eps; DiT noise, time and label dropout: the official draws are recorded and replayed,
whatever order our code asks for them in, so the stage's per-step reseeding changes nothing; the DiT
latents are tokenized online from the same images by the same frozen tokenizer with the same
per-channel latent statistics, posterior sample included) and must reproduce every loss term, the
gradient norms, the learning rates, the parameters after both optimizer steps, the EMA and the
discriminator (with its BatchNorm statistics).

Two steps, not one: Adam's first update is ~lr * sign(g) whatever betas and clipping are. The fixtures
change lr, weight decay, the EMA rate and the tokenizer clip (values in 'fixture_overrides') so that each
ingredient moves the parameters far beyond the tolerance; the official values (parsed from the launch
scripts) are checked against our stage defaults separately (``test_stage_defaults_are_official``,
``test_loss_weights_are_official``).

Tolerances (fp32, CPU): loss terms, grad norms and LR rtol 1e-5 (measured <= 2.6e-6); parameters, EMA and
discriminator state atol 1e-6 (updates are ~1e-3; measured <= 3.1e-7). One exception, by design: an
element whose clipped gradient is nonzero but below 1e-6 at some step (Adam's eps is 1e-8) has an update
lr * g / (|g| + eps) that a gradient ROUNDOFF of ~1e-9 moves by up to ~1e-5 (measured: perturbing our own
gradients by 1e-7 of their scale moves such elements by 1e-5; here 191 of 69288 tokenizer and 237 of 38392
DiT elements, max error 1.2e-5). Those elements (bounded to < 1 %) get atol 1e-4, still far below an
update. The negative controls show that each recipe ingredient, changed alone, breaks the comparison.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import types
import warnings
from types import MappingProxyType

import pytest
import torch
import torch.nn as nn

from rectok_fast.losses import build_rectok_loss
from rectok_fast.models import tokenizer as tokenizer_module
from rectok_fast.models.teacher import IMAGENET_MEAN, IMAGENET_STD, to_uint8_levels
from rectok_fast.training.config import parse_config
from rectok_fast.training.schedule import lr_at
from rectok_fast.training.stages import RunContext, build_stage

DATA = os.path.join(os.path.dirname(__file__), "data")
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6
SMALL_GRAD = 1e-6          # |clipped grad| below this: Adam-eps regime (see the module docstring)
SMALL_GRAD_ATOL = 1e-4
SMALL_GRAD_MAX_FRACTION = 0.01
CPU = torch.device("cpu")


def _load(name: str) -> dict:
    return torch.load(os.path.join(DATA, name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tok_fx():
    return _load("official_train_step_tokenizer.pt")


@pytest.fixture(scope="module")
def dit_fx():
    return _load("official_train_step_dit.pt")


# ----------------------------------------------------------------------------------------------------
# replaying the official random draws


class DrawReplay:
    """Serves the official draws to torch.rand / randn / randn_like and random.uniform, first in first
    out per kind (uniform, normal, Python uniform), so our code may interleave kinds differently from the
    official code (e.g. DiT time before noise). Element counts and the uniform bounds must match."""

    def __init__(self, draws: list, monkeypatch):
        self.queues = {"uniform": [], "normal": [], "py_uniform": []}
        for d in draws:
            self.queues[d["kind"]].append(d["values"])
        self.mp = monkeypatch

    def _next(self, kind, shape, device, dtype):
        q = self.queues[kind]
        numel = math.prod(shape)
        if not q:
            raise AssertionError(f"our code draws {kind} {tuple(shape)} but the official step made no further "
                                 f"{kind} draw")
        v = q.pop(0)
        if v.numel() != numel:
            raise AssertionError(f"our code draws {kind} {tuple(shape)} ({numel} values) where the official step "
                                 f"drew {v.numel()} values")
        return v.reshape(shape).to(device=device, dtype=dtype or torch.get_default_dtype())

    @staticmethod
    def _shape(args, kwargs):
        if "size" in kwargs:
            args = (kwargs["size"],)
        if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            return tuple(args[0])
        return tuple(int(a) for a in args)

    def __enter__(self):
        def rand(*a, **k):
            return self._next("uniform", self._shape(a, k), k.get("device"), k.get("dtype"))

        def randn(*a, **k):
            return self._next("normal", self._shape(a, k), k.get("device"), k.get("dtype"))

        def randn_like(x, **k):
            return self._next("normal", tuple(x.shape), k.get("device", x.device), k.get("dtype", x.dtype))

        def uniform(a, b):
            if not self.queues["py_uniform"]:
                raise AssertionError("our code draws random.uniform but the official step made no further one")
            lo, hi, v = self.queues["py_uniform"].pop(0).tolist()
            assert (a, b) == pytest.approx((lo, hi)), f"mask ratio drawn from U({a}, {b}), officially U({lo}, {hi})"
            return v

        self.mp.setattr(torch, "rand", rand)
        self.mp.setattr(torch, "randn", randn)
        self.mp.setattr(torch, "randn_like", randn_like)
        self.mp.setattr(random, "uniform", uniform)
        return self

    def __exit__(self, *exc):
        self.mp.undo()
        return False

    def assert_used_up(self):
        left = {k: len(v) for k, v in self.queues.items() if v}
        assert not left, f"the official step made draws our step did not: {left}"


class SmallGradients:
    """Per parameter, the elements whose clipped gradient (as the optimizer sees it) is nonzero but below
    SMALL_GRAD at some step: there Adam's update is ill-conditioned (module docstring)."""

    def __init__(self, *engines):
        self.mask = {}
        for e in engines:
            names = {id(p): n for n, p in e.module.named_parameters()}
            e.optimizer.register_step_pre_hook(lambda opt, a, k, names=names: self._record(opt, names))

    def _record(self, opt, names):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    mag = p.grad.detach().abs()
                    small = (mag > 0) & (mag < SMALL_GRAD)   # an exact zero (e.g. an unused class row) is exact
                    n = names[id(p)]
                    self.mask[n] = self.mask[n] | small if n in self.mask else small


# ----------------------------------------------------------------------------------------------------
# frozen nets at the fixture's sizes (identical weights on both sides)


class _ConvTeacher(nn.Module):
    """The fixture's frozen teacher: a patch convolution over the DINOv3 pixel values (uint8 levels,
    1/255, ImageNet normalization), tokens out; officially it received the same pixel values."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.embed_dim = dim
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images):
        m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (to_uint8_levels(images) / 255.0 - m) / s
        return self.proj(x).flatten(2).transpose(1, 2)


def _narrow_perceptual_nets(fx, mp) -> None:
    """Make torchvision build the fixture's narrow VGG16-layout trunk (however our LPIPS asks for it:
    ``vgg16()`` or ``make_layers(cfgs['D'])``) and its small ConvNeXt; the weights are loaded afterwards."""
    import torchvision.models
    import torchvision.models.vgg as tv_vgg
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    p = fx["perceptual"]
    cfg = [v if v == "M" else int(v) for v in p["vgg_cfg"]]
    make_layers = tv_vgg.make_layers

    def narrow_layers(*a, **k):
        return make_layers(cfg, batch_norm=False)

    def convnext_small(*a, **k):
        blocks = [CNBlockConfig(c[0], c[1], c[2]) for c in p["convnext"]]
        return ConvNeXt(blocks, stochastic_depth_prob=0.0, num_classes=p["convnext_classes"])
    mp.setattr(tv_vgg, "make_layers", narrow_layers)
    mp.setattr(torchvision.models, "vgg16", lambda *a, **k: types.SimpleNamespace(features=narrow_layers()))
    mp.setattr(torchvision.models, "convnext_small", convnext_small)


def _tokenizer_config(fx, out_dir, init_path):
    """Our stage-1 RunConfig as the launcher resolves it: the official preset (so every recipe value
    not in the fixture's 'fixture_overrides' is OUR stage default), the fixture's overrides as flags,
    the initial weights as --load_from; the model and discriminator at the fixture's sizes."""
    o = fx["fixture_overrides"]
    assert set(o) == {"lr", "weight_decay", "ema_rate", "grad_clip"}, o
    cfg = parse_config(["--preset", "official", "--stage", "tokenizer", "--model", fx["ours"]["preset"],
                        "--img_size", str(fx["ours"]["overrides"]["img_size"]),
                        "--batch_size", str(fx["batches"][0].shape[0]), "--lr", repr(o["lr"]),
                        "--weight_decay", repr(o["weight_decay"]), "--ema_decay", repr(o["ema_rate"]),
                        "--clip_grad", repr(o["grad_clip"]), "--load_from", init_path, "--output_dir", out_dir,
                        "--num_workers", "0", "--no_progress"])
    disc = fx["perceptual"]["disc"]
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, overrides=MappingProxyType(dict(fx["ours"]["overrides"]))),
        loss=dataclasses.replace(cfg.loss, disc_ndf=disc["ndf"], disc_layers=disc["n_layers"]))


def _build_tokenizer_stage(fx, monkeypatch, tmp_path, mutate_cfg=None):
    """OUR TokenizerStage, built in-process from the config: it loads the fixture's initial weights
    (--load_from), attaches the teacher, builds the loss module (weights, GAN start, perceptual nets) and
    the EMA; the engines are the stage's. The test only substitutes the frozen nets' fixture-sized
    architectures (teacher, narrow VGG / ConvNeXt; same weights as the official run) and loads their weights."""
    from rectok_fast.models import registry
    from rectok_fast.models.perceptual import NetLinLayer
    for name, size in fx["ours"]["size_dict"].items():
        monkeypatch.setitem(tokenizer_module.SIZE_DICT, name, dict(size))
    init_path = str(tmp_path / "init_tokenizer.pth")
    torch.save({"model": fx["init_state"]}, init_path)
    cfg = _tokenizer_config(fx, str(tmp_path / "run"), init_path)
    if mutate_cfg is not None:
        cfg = mutate_cfg(cfg)
    teacher = _ConvTeacher(fx["ours"]["overrides"]["teachers"]["dinov3"], fx["ours"]["overrides"]["patch_size"])
    teacher.load_state_dict(fx["teacher"])

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random stand-in warnings: the weights are loaded just below
        _narrow_perceptual_nets(fx, mp)
        # the fixture's teacher (the official run's) is a patch convolution; for rectok_BB the registry
        # would build a random DINOv3 ViT-L
        mp.setattr(registry, "build_teacher_for", lambda variant, weights, img_size, kind: teacher)
        stage = build_stage(cfg, RunContext.local(cfg), engines=False)
    for k, ch in enumerate(fx["perceptual"]["vgg_channels"]):   # frozen and in eval mode (dropout off) as LPIPS's own
        setattr(stage.loss.perceptual_loss.lpips, f"lin{k}", NetLinLayer(ch).requires_grad_(False).eval())
    stage.loss.load_state_dict(fx["loss_init_state"], strict=True)   # frozen nets + the initial discriminator
    stage.engines()
    return cfg, stage


def _our_tokenizer_step(cfg, stage, images, step, spe):
    """One stage-1 step exactly as the trainer runs it: LR from the config's schedule, then the stage's
    train_step (G forward + losses -> backward -> clip + step -> EMA -> D on the same reconstructions)."""
    epoch_f = step / spe
    lr = lr_at(cfg.schedule, epoch_f)
    stage.set_lr(lr)
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    out = stage.train_step([{"images": images, "labels": labels, "rank": 0}], step, epoch_f)
    assert not out.skipped, out.skipped
    logs = dict(out.logs)
    logs["total_loss"] = logs.pop("loss")
    grad_norm, d_grad_norm = logs.pop("grad_norm"), logs.pop("d_grad_norm", float("nan"))
    return {k: float(v) for k, v in logs.items()}, float(grad_norm), float(d_grad_norm), lr


def _run_tokenizer(fx, monkeypatch, tmp_path, mutation=None):
    mutation = mutation or {}
    cfg, stage = _build_tokenizer_stage(fx, monkeypatch, tmp_path, mutation.get("cfg"))
    small = SmallGradients(*stage.engine_list)
    if "stage" in mutation:
        mutation["stage"](stage)
    got = []
    with DrawReplay(fx["draws"], pytest.MonkeyPatch()) as replay:
        for i, images in enumerate(fx["batches"]):
            step = fx["epoch"] * fx["steps_per_epoch"] + i      # the global optimizer step of the official run
            logs, gn, dn, lr = _our_tokenizer_step(cfg, stage, images, step, fx["steps_per_epoch"])
            got.append(dict(logs=logs, grad_norm=gn, discriminator_grad_norm=dn, lr=lr))
    replay.assert_used_up()
    return got, stage.model, stage.loss, stage.ema, small.mask


# ----------------------------------------------------------------------------------------------------
# DiT


def _dit_config(fx, out_dir, init_path, tokenizer_path, stats_path):
    """Our DiT RunConfig: the official preset with the fixture's overrides as flags, the initial DiT as
    --load_from, the frozen tokenizer as --tokenizer_ckpt (its 'model_ema', as for official files), the
    latent statistics as --latent_stats; the DiT and tokenizer at the fixture's sizes."""
    o = fx["fixture_overrides"]
    assert set(o) == {"weight_decay", "ema_rate"}, o
    ours = fx["ours"]
    cfg = parse_config(["--preset", "official", "--stage", "dit", "--model", ours["preset"],
                        "--tokenizer", ours["tokenizer_preset"], "--num_classes", str(ours["overrides"]["num_classes"]),
                        "--img_size", str(ours["tokenizer_overrides"]["img_size"]),
                        "--batch_size", str(fx["labels"][0].shape[0]),
                        "--weight_decay", repr(o["weight_decay"]), "--ema_decay", repr(o["ema_rate"]),
                        "--load_from", init_path, "--tokenizer_ckpt", tokenizer_path, "--latent_stats", stats_path,
                        "--output_dir", out_dir, "--num_workers", "0", "--no_progress"])
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, overrides=MappingProxyType(dict(ours["overrides"])),
        tokenizer_overrides=MappingProxyType(dict(ours["tokenizer_overrides"]))))


def _build_dit_stage(fx, monkeypatch, tmp_path, mutate_cfg=None):
    """OUR DiTStage from the config: it loads the frozen decode-only tokenizer, the latent statistics and
    the initial DiT from files, computes the time shift, builds the EMA and the engine."""
    from rectok_fast.latent_stats import save_latent_stats
    for name, size in fx["ours"]["tokenizer_size_dict"].items():
        monkeypatch.setitem(tokenizer_module.SIZE_DICT, name, dict(size))
    paths = {n: str(tmp_path / f"{n}.pth") for n in ("init", "tokenizer", "stats")}
    torch.save({"model": fx["init_state"]}, paths["init"])
    torch.save({"model_ema": fx["tokenizer_state"]}, paths["tokenizer"])
    save_latent_stats(paths["stats"], fx["latent_mean"], fx["latent_std"])
    cfg = _dit_config(fx, str(tmp_path / "run"), paths["init"], paths["tokenizer"], paths["stats"])
    if mutate_cfg is not None:
        cfg = mutate_cfg(cfg)
    stage = build_stage(cfg, RunContext.local(cfg), engines=True)
    return cfg, stage


def _images(u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] as the official loader (ToTensor, Normalize(0.5, 0.5))."""
    return (u8.float() / 255 - 0.5) / 0.5


def _our_dit_step(cfg, stage, images, labels, step, spe):
    """One DiT step as the trainer: LR from the config's schedule, then the stage's train_step (online
    latents: posterior sample, normalized, no grad -> flow-matching loss -> backward -> clip + step -> EMA)."""
    epoch_f = step / spe
    lr = lr_at(cfg.schedule, epoch_f)
    stage.set_lr(lr)
    out = stage.train_step([{"images": images, "labels": labels, "rank": 0}], step, epoch_f)
    assert not out.skipped, out.skipped
    return float(out.logs["loss"]), float(out.logs["grad_norm"]), lr


def _run_dit(fx, monkeypatch, tmp_path, mutation=None):
    mutation = mutation or {}
    cfg, stage = _build_dit_stage(fx, monkeypatch, tmp_path, mutation.get("cfg"))
    small = SmallGradients(stage.G)
    if "stage" in mutation:
        mutation["stage"](stage)
    got = []
    with DrawReplay(fx["draws"], pytest.MonkeyPatch()) as replay:
        for i, (u8, labels) in enumerate(zip(fx["images_u8"], fx["labels"])):
            step = fx["epoch"] * fx["steps_per_epoch"] + i
            loss, gn, lr = _our_dit_step(cfg, stage, _images(u8), labels, step, fx["steps_per_epoch"])
            got.append(dict(loss=loss, grad_norm=gn, lr=lr))
    replay.assert_used_up()
    return got, stage.model, stage.ema, stage.shift, small.mask


# ----------------------------------------------------------------------------------------------------
# comparisons


TOK_GENERATOR_TERMS = ("total_loss", "reconstruction_loss", "perceptual_loss", "kl_loss", "sem_loss", "gan_loss",
                       "weighted_gan_loss", "discriminator_factor", "psnr")
TOK_DISCRIMINATOR_TERMS = ("discriminator_loss", "logits_real", "logits_fake")


def _close(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=LOSS_RTOL, abs=1e-9), f"{what}: ours {got!r}, official {want!r}"


def _assert_state(got: dict, want: dict, what: str, small_grad: dict) -> None:
    assert set(got) == set(want), (f"{what}: keys differ: only ours {sorted(set(got) - set(want))[:5]}, "
                                   f"only official {sorted(set(want) - set(got))[:5]}")
    n_small = n_all = 0
    for k in sorted(want):
        diff = (got[k].double() - want[k].double()).abs()
        small = small_grad.get(k, torch.zeros_like(diff, dtype=torch.bool))
        n_small, n_all = n_small + int(small.sum()), n_all + small.numel()
        tight, loose = diff[~small], diff[small]
        if tight.numel():
            assert tight.max() <= PARAM_ATOL, f"{what}: {k} differs from the official by {tight.max():.3e}"
        if loose.numel():
            assert loose.max() <= SMALL_GRAD_ATOL, (f"{what}: {k} (|grad| < {SMALL_GRAD}) differs from the "
                                                    f"official by {loose.max():.3e}")
    assert n_small <= SMALL_GRAD_MAX_FRACTION * n_all, f"{what}: {n_small} of {n_all} elements in the Adam-eps regime"


def _compare_tokenizer(fx, got, model, loss, ema, small) -> None:
    for i, (g, want) in enumerate(zip(got, fx["steps"])):
        _close(g["lr"], want["lr"], f"step {i} lr")
        for k in TOK_GENERATOR_TERMS:
            _close(g["logs"][k], want["generator"][k], f"step {i} {k}")
        for k in TOK_DISCRIMINATOR_TERMS:
            _close(g["logs"][k], want["discriminator"][k], f"step {i} {k}")
        _close(g["grad_norm"], want["grad_norm"], f"step {i} generator grad norm")
        _close(g["discriminator_grad_norm"], want["discriminator_grad_norm"], f"step {i} discriminator grad norm")
    _assert_state({k: p.detach() for k, p in model.named_parameters()}, fx["params_after"], "parameters after 2 steps",
                  small)
    _assert_state(ema.shadow, fx["ema_after"], "EMA after 2 steps", small)
    _assert_state({k: v.detach() for k, v in loss.discriminator.state_dict().items()}, fx["discriminator_after"],
                  "discriminator (parameters and BatchNorm statistics) after 2 steps", small)


def _compare_dit(fx, got, dit, ema, small) -> None:
    for i, (g, want) in enumerate(zip(got, fx["steps"])):
        _close(g["lr"], want["lr"], f"step {i} lr")
        _close(g["loss"], want["loss"], f"step {i} flow-matching loss")
        _close(g["grad_norm"], want["grad_norm"], f"step {i} grad norm")
    _assert_state({k: p.detach() for k, p in dit.named_parameters()}, fx["params_after"], "parameters after 2 steps",
                  small)
    _assert_state(ema.shadow, fx["ema_after"], "EMA after 2 steps", small)


# ----------------------------------------------------------------------------------------------------
# tests


def test_fixtures_exercise_every_ingredient(tok_fx, dit_fx):
    """Guards the fixture itself: GAN on, masking on, both nets clipped, label dropout drawn and hit, DiT
    time shift active, and parameter updates far above the tolerance."""
    assert tok_fx["epoch"] >= tok_fx["hparams"]["disc_start_epoch"]
    assert all(s["generator"]["discriminator_factor"] == 1.0 for s in tok_fx["steps"])
    ratios = [d["values"][2].item() for d in tok_fx["draws"] if d["kind"] == "py_uniform"]
    assert len(ratios) == 2 and max(ratios) > 0, "no step masks tokens"
    for s in tok_fx["steps"]:
        assert min(s["grad_norm"], s["discriminator_grad_norm"]) > tok_fx["hparams"]["grad_clip"]
    for s in dit_fx["steps"]:
        assert s["grad_norm"] > dit_fx["hparams"]["grad_clip"]
    assert dit_fx["hparams"]["time_dist_shift"] > 1.0
    b = dit_fx["labels"][0].shape[0]
    drops = [d["values"] for d in dit_fx["draws"] if d["kind"] == "uniform" and d["values"].numel() == b][1::2]
    assert len(drops) == 2 and any((v < 0.1).any() for v in drops), "no label dropped"
    for fx in (tok_fx, dit_fx):
        moved = max((fx["params_after"][k] - fx["init_state"][k]).abs().max().item() for k in fx["params_after"])
        assert moved > 100 * PARAM_ATOL


def test_tokenizer_step_matches_official(tok_fx, monkeypatch, tmp_path):
    got, model, loss, ema, small = _run_tokenizer(tok_fx, monkeypatch, tmp_path)
    _compare_tokenizer(tok_fx, got, model, loss, ema, small)


def test_dit_step_matches_official(dit_fx, monkeypatch, tmp_path):
    got, dit, ema, shift, small = _run_dit(dit_fx, monkeypatch, tmp_path)
    assert shift == pytest.approx(dit_fx["hparams"]["time_dist_shift"], rel=1e-12)
    _compare_dit(dit_fx, got, dit, ema, small)


# the official launch scripts' values (parsed into the fixtures with the official argument parsers) and
# the name of the same setting among our stage defaults
_TOKENIZER_STAGE_KEYS = dict(epochs="epochs", batch_size="batch_size", blr="blr", min_lr="min_lr",
                             warmup_rate="warmup_rate", weight_decay="weight_decay", grad_clip="clip_grad",
                             ema_rate="ema_decay", discriminator_start_epoch="disc_start_epoch")
OFFICIAL_TO_OURS = {
    "tokenizer": ("official_args", _TOKENIZER_STAGE_KEYS),
    "decoder_ft": ("official_args_decoder_ft", _TOKENIZER_STAGE_KEYS),
    "dit": ("official_args", dict(epochs="epochs", batch_size="batch_size", lr="lr", min_lr="end_lr",
                                  warmup_start_epoch="decay_start_epoch", weight_decay="weight_decay",
                                  grad_clip="clip_grad", ema_rate="ema_decay")),
}


def _our_stage_defaults(stage: str) -> dict:
    from rectok_fast.training.config import STAGE_DEFAULTS
    return STAGE_DEFAULTS[stage]


@pytest.mark.parametrize("stage", list(OFFICIAL_TO_OURS))
def test_stage_defaults_are_official(tok_fx, dit_fx, stage):
    """The hyper-parameters the step fixtures override (to make them visible) must be official by default."""
    from rectok_fast.training.optim import BETAS
    key, names = OFFICIAL_TO_OURS[stage]
    official = (dit_fx if stage == "dit" else tok_fx)[key]
    ours = _our_stage_defaults(stage)
    for theirs, mine in names.items():
        want = official[theirs]
        assert ours[mine] == pytest.approx(want), f"{stage} {mine}: ours {ours[mine]}, official {theirs}={want}"
    assert BETAS == (official["beta1"], official["beta2"])
    if stage == "dit":   # the linear decay ends at the last epoch
        assert official["ditdh_sched"] and official["lr_sched"] == "linear"
        assert official["warmup_end_epoch"] == official["epochs"] == ours["epochs"]
    else:
        assert official["lr_sched"] == "cosine"


@pytest.mark.parametrize("stage", ["tokenizer", "decoder_ft"])
def test_loss_weights_are_official(tok_fx, stage):
    """The weights the official loss module really uses (its discriminator weight is the class default 0.1:
    create_loss_module never forwards the scripts' 0.5) are our stage's defaults."""
    want = tok_fx["official_loss_weights" if stage == "tokenizer" else "official_loss_weights_decoder_ft"]
    loss = build_rectok_loss(stage, perceptual=None)
    got = dict(reconstruction_weight=loss.rec_weight, perceptual_weight=loss.perceptual_weight,
               kl_weight=loss.kl_weight, sem_weight=loss.sem_weight, discriminator_weight=loss.disc_weight,
               discriminator_start_epoch=loss.disc_start_epoch, reconstruction_loss=loss.reconstruction_loss,
               logvar=float(loss.logvar))
    for k, v in got.items():
        same = v == pytest.approx(want[k]) if isinstance(v, float) else v == want[k]
        assert same, f"{stage} {k}: ours {v}, official {want[k]}"
    assert want["sem_loss_type"] == "cosine" and (want["lpips_weight"], want["convnext_weight"]) == (1.0, 0.1)


def _set_betas(opt, betas):
    for g in opt.param_groups:
        g["betas"] = betas


def _decay_everything(engine, wd):
    for g in engine.optimizer.param_groups:
        g["weight_decay"] = wd


def _replace_schedule(**changes):
    return lambda cfg: dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, **changes))


# Each mutation changes one recipe ingredient: "stage" edits the built stage (what a bug in the stage or
# engine code would do), "cfg" the resolved config before the stage is built (a wrong default/derivation).
TOKENIZER_MUTATIONS = {
    "adam betas (0.9, 0.999)": dict(stage=lambda st: (_set_betas(st.G.optimizer, (0.9, 0.999)),
                                                      _set_betas(st.D.optimizer, (0.9, 0.999)))),
    "weight decay on every tensor": dict(stage=lambda st: (_decay_everything(st.G, 0.5),
                                                           _decay_everything(st.D, 0.5))),
    "no gradient clipping": dict(stage=lambda st: (setattr(st.G, "clip", 0.0), setattr(st.D, "clip", 0.0))),
    "GAN weight 0.5 (the script's unused value)": dict(stage=lambda st: setattr(st.loss, "disc_weight", 0.5)),
    "KL weight 1e-5": dict(stage=lambda st: setattr(st.loss, "kl_weight", 1e-5)),
    "EMA decay 0.99": dict(stage=lambda st: setattr(st.ema, "decay", 0.99)),
    "cosine schedule without the warmup": dict(cfg=_replace_schedule(warmup_epochs=0.0)),
}


@pytest.mark.parametrize("name", list(TOKENIZER_MUTATIONS))
def test_tokenizer_check_catches_a_recipe_change(tok_fx, monkeypatch, tmp_path, name):
    got, model, loss, ema, small = _run_tokenizer(tok_fx, monkeypatch, tmp_path, TOKENIZER_MUTATIONS[name])
    with pytest.raises(AssertionError):
        _compare_tokenizer(tok_fx, got, model, loss, ema, small)


DIT_MUTATIONS = {
    "no time shift": dict(stage=lambda st: setattr(st, "shift", 1.0)),
    "adam betas (0.9, 0.999)": dict(stage=lambda st: _set_betas(st.G.optimizer, (0.9, 0.999))),
    "weight decay on every tensor": dict(stage=lambda st: _decay_everything(st.G, 0.5)),
    "latents without the channel statistics": dict(stage=lambda st: st.tok.set_latent_stats(torch.tensor(0.0),
                                                                                            torch.tensor(1.0))),
    "constant LR (no linear decay after epoch 40)": dict(cfg=_replace_schedule(decay_start_epoch=800.0)),
}


@pytest.mark.parametrize("name", list(DIT_MUTATIONS))
def test_dit_check_catches_a_recipe_change(dit_fx, monkeypatch, tmp_path, name):
    got, dit, ema, _, small = _run_dit(dit_fx, monkeypatch, tmp_path, DIT_MUTATIONS[name])
    with pytest.raises(AssertionError):
        _compare_dit(dit_fx, got, dit, ema, small)
