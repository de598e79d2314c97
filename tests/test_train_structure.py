"""The trainer's structure: stages built in-process from a typed config, weights honoured in every preset,
the non-finite guard of each update, gradient accumulation, milestones and self-describing outputs."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from rectok_fast.training.config import parse_config
from rectok_fast.training.stages import RunContext, build_stage

HERE = os.path.dirname(os.path.abspath(__file__))


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _ema(stage) -> dict:
    return {k: v.clone() for k, v in stage.ema.shadow.items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# weights honoured in every preset


def _zero_perceptual_files(tmp_path) -> dict:
    """All-zero weights in the layouts rectok_fast.models.perceptual loads: torchvision vgg16 'features.*',
    the LPIPS heads 'lin{k}.model.1.weight', a full torchvision convnext_small state dict."""
    from torchvision.models import convnext_small
    from torchvision.models.vgg import cfgs, make_layers
    vgg = {f"features.{k}": torch.zeros_like(v) for k, v in make_layers(cfgs["D"]).state_dict().items()}
    lin = {f"lin{k}.model.1.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in convnext_small(weights=None).state_dict().items()}
    cnx = {k: torch.zeros(s, dtype=d) for k, (s, d) in shapes.items()}
    files = {}
    for name, sd in (("vgg", vgg), ("lpips", lin), ("convnext", cnx)):
        files[name] = str(tmp_path / f"{name}.pth")
        torch.save(sd, files[name])
    return files


def test_official_preset_uses_the_given_perceptual_weights(tmp_path, monkeypatch):
    """The official preset (rectok_BB with LPIPS-VGG + ConvNeXt-S, here at 32 px) built by the stage from
    --vgg_weights/--lpips_weights/--convnext_weights: all-zero files make the perceptual loss exactly 0,
    and the pretrained summary names the files. (Control: random stand-ins give a non-zero term.) The
    ViT-L teacher is swapped for a 1-block one of the same width: it plays no part in this loss."""
    from rectok_fast.models import registry
    from rectok_fast.models.teacher import build_teacher
    monkeypatch.setattr(registry, "build_teacher_for",
                        lambda name, weights, img_size, kind="dinov3": build_teacher(
                            kind, weights, img_size=img_size, depth=1, embed_dim=1024, num_heads=16))
    f = _zero_perceptual_files(tmp_path)
    cfg = parse_config(["--preset", "official", "--img_size", "32", "--batch_size", "2", "--output_dir",
                        str(tmp_path / "o"), "--vgg_weights", f["vgg"], "--lpips_weights", f["lpips"],
                        "--convnext_weights", f["convnext"]])
    assert cfg.model.variant == "rectok_BB" and cfg.loss.convnext and cfg.loss.convnext_size == 224
    stage = build_stage(cfg, RunContext.local(cfg), engines=False)
    got = dict(stage.pretrained)
    assert got["LPIPS VGG16 trunk"] == f["vgg"] and got["LPIPS lin heads"] == f["lpips"]
    assert got["ConvNeXt-S"] == f["convnext"] and got["teacher dinov3"] == "RANDOM"
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = stage.model(x)
    _, logs = stage.loss.generator_loss(x, out, 0.0)
    assert logs["perceptual_loss"].item() == 0.0 and logs["reconstruction_loss"].item() > 0
    from rectok_fast.models.perceptual import LPIPS
    r01 = out.recon.detach().float() * 0.5 + 0.5
    assert LPIPS()(x, r01 * 2 - 1).mean().item() > 0          # the control: random VGG / heads


# ---------------------------------------------------------------------------------------------------
# the non-finite guard


def test_nonfinite_updates_are_skipped_per_engine(tmp_path):  # plain engines; DeepSpeed: below
    """A NaN discriminator loss skips only the discriminator's update (the generator and its EMA move);
    a NaN generator loss skips the whole step: generator, EMA and discriminator stay as they were."""
    from train_hooked import NonFiniteAt
    cfg = parse_config(["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--disc_start_epoch", "0",
                        "--output_dir", str(tmp_path / "o")])
    stage = build_stage(cfg, RunContext.local(cfg))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    chunks = [{"images": x, "labels": torch.zeros(2, dtype=torch.long), "rank": 0}]
    g0, d0, e0 = _params(stage.model), _params(stage.loss.discriminator), _ema(stage)
    out = stage.train_step(chunks, 0, 0.0, hooks=NonFiniteAt({0}, "discriminator"))
    assert out.skipped == ("discriminator",) and not torch.isfinite(torch.as_tensor(out.logs["d_grad_norm"]))
    assert _same(d0, _params(stage.loss.discriminator))
    g1, e1 = _params(stage.model), _ema(stage)
    assert not _same(g0, g1) and not _same(e0, e1)
    out = stage.train_step(chunks, 1, 0.0, hooks=NonFiniteAt({1}, "generator", float("inf")))
    assert out.skipped == ("generator",)
    assert _same(g1, _params(stage.model)) and _same(e1, _ema(stage))
    assert _same(d0, _params(stage.loss.discriminator))
    out = stage.train_step(chunks, 2, 0.0)
    assert out.skipped == () and not _same(d0, _params(stage.loss.discriminator))


# ---------------------------------------------------------------------------------------------------
# gradient accumulation


def _check_accumulation(d: dict) -> None:
    assert d["skipped"] == [[], []]
    assert d["loss"][0] == pytest.approx(d["loss"][1], rel=1e-6)
    assert d["grad_norm"][0] == pytest.approx(d["grad_norm"][1], rel=1e-5)
    # one Adam step moves a weight by ~lr = 1e-3; the two ways differ by float rounding only
    assert d["param_max_update"] > 5e-4 and d["param_max_diff"] < 1e-6, d


def test_grad_accumulation_equals_the_large_batch_plain(tmp_path):
    """2 micro steps x batch 2 == 1 step x batch 4 (plain engine, in-process)."""
    from _grad_accum_check import accumulation_diffs
    _check_accumulation(accumulation_diffs(str(tmp_path)))


@pytest.mark.slow
def test_grad_accumulation_and_nonfinite_guard_deepspeed(tmp_path):
    """The same through DeepSpeed ZeRO-2 (1 process): its gradient_accumulation_steps follows --grad_accum
    and the update happens once, at the accumulation boundary. And a NaN loss skips the update under
    ZeRO-2 (DeepSpeed's own check) and ZeRO-0 fp32 (our engine's check)."""
    from test_train_distributed import DS, ROOT, _env
    r = subprocess.run([DS, "--master_port", "29761", os.path.join(HERE, "_grad_accum_check.py"), str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from _grad_accum_check import MARK
    line = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    assert line, r.stdout[-3000:]
    res = json.loads(line[-1][len(MARK):])
    _check_accumulation(res["accumulation"])
    for zero in ("nonfinite_zero2", "nonfinite_zero0"):       # the DeepSpeed side of the non-finite guard
        assert res[zero] == {"skipped": [["generator"], []], "unchanged_after_nan": True, "finite_after_nan": True,
                             "updated_after": True}, (zero, res[zero])


# ---------------------------------------------------------------------------------------------------
# a run: milestones by epoch, self-describing outputs


def test_dit_run_milestones_and_self_describing_final(tmp_path):
    """16 steps/epoch, --keep_every_epochs 0.25 with --ckpt_every 3 and --keep_last 1: the milestones at
    steps 4 and 8 survive pruning; final.pth describes its variant, latent stats and tokenizer, and
    build_from_checkpoint gives back the EMA model from the file alone."""
    from rectok_fast.checkpoint import CONFIG_KEY, build_from_checkpoint
    from rectok_fast.training import resume as R
    from rectok_fast.training.trainer import run
    out = str(tmp_path / "dit")
    res = run(parse_config(["--preset", "tiny", "--stage", "dit", "--max_steps", "10", "--keep_every_epochs", "0.25",
                            "--ckpt_every", "3", "--keep_last", "1", "--output_dir", out, "--no_progress"]))
    assert res["steps"] == 10 and ("tokenizer (--tokenizer_ckpt)", "RANDOM") in res["pretrained"]
    root = os.path.join(out, "checkpoints")
    assert R.list_tags(root) == ["step_00000004", "step_00000008", "step_00000010"]
    ck = torch.load(os.path.join(out, "final.pth"), map_location="cpu", weights_only=True)
    desc = ck[CONFIG_KEY]
    assert desc["kind"] == "dit" and desc["variant"] == "ditdh_tiny" and desc["overrides"] == {"input_size": 2}
    assert desc["tokenizer"]["variant"] == "rectok_tiny_decft" and desc["tokenizer"]["overrides"] == {"img_size": 32}
    stats = torch.load(os.path.join(out, "latent_stats.pt"), weights_only=True)
    assert torch.equal(desc["latent_stats"]["std"], stats["std"])
    model, _ = build_from_checkpoint(os.path.join(out, "final.pth"))
    assert model.config.input_size == 2 and all(torch.equal(p, ck["model_ema"][k]) for k, p in model.named_parameters())
    assert ck["args"]["stage"] == "dit" and ck["step"] == 10
