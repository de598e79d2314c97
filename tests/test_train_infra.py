"""Trainer infrastructure with trivial models: schedules, weight-decay groups, EMA (incl. the stage-2
quirk), checkpoint completeness, config validation, NaN skipping, latent cache vs online."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

from rectok_fast.training import config as C
from rectok_fast.training import resume as R
from rectok_fast.training.ema import EMA
from rectok_fast.training.optim import BETAS, build_adamw, param_groups
from rectok_fast.training.schedule import constant_then_linear_lr, warmup_cosine_lr


def test_schedules_official_points():
    # stage 1: warmup 50 of 200 epochs, peak 4e-4, cosine to 0
    f = lambda e: warmup_cosine_lr(e, 4e-4, 0.0, 50, 200)
    assert f(0) == 0 and f(25) == pytest.approx(2e-4) and f(50) == pytest.approx(4e-4)
    assert f(125) == pytest.approx(2e-4) and f(200) == pytest.approx(0, abs=1e-12)
    assert f(10.5) == pytest.approx(4e-4 * 10.5 / 50)            # fractional epoch, per step
    # DiT: constant 2e-4 to epoch 40, linear to 2e-5 at 800
    g = lambda e: constant_then_linear_lr(e, 2e-4, 2e-5, 40, 800)
    assert g(0) == g(40) == 2e-4 and g(800) == pytest.approx(2e-5) and g(420) == pytest.approx(1.1e-4)
    assert g(900) == pytest.approx(2e-5)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.ln_post = nn.Linear(8, 8)
        self.mask_token = nn.Parameter(torch.zeros(1, 8))
        self.qkv = nn.Linear(8, 24)
        self.decoder = nn.Linear(8, 4)

    def forward(self, x):
        return self.decoder(self.qkv(self.blocks(self.patch_embed(x)))[..., :8] + self.mask_token)


def test_weight_decay_groups_official_rules():
    groups = {g["weight_decay"]: set(g["names"]) for g in param_groups(Toy(), 1e-4)}
    decayed = groups[1e-4]
    assert decayed == {"blocks.0.weight", "qkv.weight", "decoder.weight"}
    assert {"patch_embed.weight", "ln_post.weight", "mask_token", "blocks.1.weight", "qkv.bias"} <= groups[0.0]
    opt = build_adamw(Toy(), 1e-3, 1e-4)
    assert opt.defaults["betas"] == BETAS == (0.9, 0.95)


def test_ema_update_and_stage2_quirk():
    m = Toy()
    ema = EMA(m, 0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    # stage 2: only the decoder trains; EMA was initialised from a different ("stage-1 EMA") state
    for p in m.parameters():
        p.requires_grad_(False)
    m.decoder.requires_grad_(True)
    ema.shadow["qkv.weight"].add_(1.0)                     # EMA encoder differs from the model encoder
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    ema.update(m)
    assert torch.equal(ema.shadow["qkv.weight"], m.qkv.weight)                  # frozen: copied
    want = 0.9 * start["decoder.weight"] + 0.1 * m.decoder.weight
    assert torch.allclose(ema.shadow["decoder.weight"], want, atol=1e-6)        # trained: averaged


def test_checkpoint_marker_latest_and_cut_off(tmp_path):
    root = str(tmp_path)
    for step in (4, 8):
        d = tmp_path / R.tag_for(step)
        d.mkdir()
        (d / "G").mkdir()
        (d / "G" / "state.pt").write_bytes(b"x" * (100 + step))
        R.mark_complete(root, R.tag_for(step))
    assert R.find_resume_tag(root) == "step_00000008"
    # a checkpoint cut off mid-write: files but no COMPLETE marker, latest not yet moved
    d = tmp_path / R.tag_for(12)
    d.mkdir()
    (d / "G").mkdir()
    (d / "G" / "state.pt").write_bytes(b"partial")
    assert R.find_resume_tag(root) == "step_00000008"
    # even if 'latest' named it, an incomplete checkpoint is never taken
    (tmp_path / "latest").write_text("step_00000012")
    assert R.find_resume_tag(root) == "step_00000008"
    # a file truncated after completion (size no longer matches the manifest) invalidates it
    with open(tmp_path / "step_00000008" / "G" / "state.pt", "r+b") as fh:
        fh.truncate(10)
    assert R.find_resume_tag(root) == "step_00000004"
    R.prune(root, keep_last=1)
    # nothing older than the newest valid one exists; newer invalid folders are kept (could be in flight)
    assert R.list_tags(root) == ["step_00000004", "step_00000008", "step_00000012"]


@pytest.mark.parametrize("argv, msg", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--data_path", "/nonexistent/folder"], "is not a folder"),
    (["--stage", "tokenizer", "--latent_cache", "/tmp/x"], "--latent_cache is for --stage dit"),
    (["--ema_decay", "1.5"], "--ema_decay"),
    (["--deepspeed_config", "/nonexistent.json"], "does not exist"),
    (["--emulate_ranks", "0"], "--emulate_ranks"),
    (["--grad_accum", "0"], "--grad_accum must be >= 1"),
    (["--keep_every_epochs", "-1"], "--keep_every_epochs must be >= 0"),
    (["--model", "ditdh_s"], "--stage tokenizer trains a tokenizer"),
    (["--stage", "decoder_ft", "--model", "rectok_tiny"], "use --model rectok_tiny_decft"),
    (["--stage", "dit", "--vgg_weights", __file__], "--vgg_weights is for the tokenizer stages"),
    (["--no_gan", "--disc_start_epoch", "3"], "contradict"),
])
def test_bad_flags_fail_before_work(argv, msg, capsys):
    with pytest.raises(SystemExit):
        C.parse_config(argv + ["--output_dir", "/tmp/never_created_rectok"])
    assert msg in capsys.readouterr().err
    assert not os.path.exists("/tmp/never_created_rectok")


def test_config_precedence():
    a = C.parse_config(["--stage", "dit", "--preset", "official", "--batch_size", "32"])
    assert a.model.variant == "ditdh_xl" and a.model.tokenizer == "rectok_BB_decft" and dict(a.model.overrides) == {}
    assert a.optim.lr == a.schedule.lr == 2e-4 and a.schedule.end_lr == 2e-5 and a.optim.clip_grad == 1.0
    assert a.optim.ema_decay == 0.9995 and a.data.batch_size == 32 and a.schedule.decay_start_epoch == 40
    assert a.schedule.kind == "constant_linear" and a.optim.grad_accum == 1
    t = C.parse_config(["--preset", "official", "--stage", "tokenizer"])
    assert t.flags["blr"] == 1e-4 and t.optim.lr == pytest.approx(1e-4 * 64 / 256)      # blr x global / 256
    assert t.schedule.warmup_epochs == 50 and t.loss.disc_start_epoch == 100 and t.loss.convnext
    d = C.parse_config([])
    assert d.preset == "demo" and d.model.variant == "rectok_demo" and dict(d.model.overrides) == {}
    g = C.parse_config(["--stage", "dit", "--preset", "autoguide"])
    assert g.model.variant == "ditdh_s" and g.schedule.epochs == 30
    k = C.parse_config(["--stage", "dit", "--preset", "tiny"])
    assert k.model.variant == "ditdh_tiny" and k.model.tokenizer == "rectok_tiny_decft"
    assert dict(k.model.overrides) == {"input_size": 2} and dict(k.model.tokenizer_overrides) == {"img_size": 32}
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.optim.lr = 1.0


def test_grad_accum_from_ds_json_and_flag(tmp_path, monkeypatch):
    """gradient_accumulation_steps comes from ds.json or --grad_accum; the LR scales with the EFFECTIVE
    global batch (micro x accum x ranks); contradictions are refused."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = C.parse_config(["--preset", "official", "--deepspeed_config", str(ds), "--batch_size", "16"])
    assert c.optim.grad_accum == 4 and c.optim.global_batch == 16 * 4 * 2
    assert c.optim.lr == pytest.approx(1e-4 * 128 / 256)
    assert C.parse_config(["--preset", "official", "--deepspeed_config", str(ds), "--grad_accum", "4"]).optim.grad_accum == 4
    with pytest.raises(C.ConfigError, match="contradicts gradient_accumulation_steps 4"):
        C.resolve(C.build_parser().parse_args(["--preset", "official", "--deepspeed_config", str(ds), "--grad_accum", "2"]))
    ds.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 2}}))
    with pytest.raises(C.ConfigError, match="train_batch_size 100"):
        C.resolve(C.build_parser().parse_args(["--preset", "official", "--deepspeed_config", str(ds)]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert C.parse_config(["--preset", "tiny", "--grad_accum", "3"]).optim.global_batch == 12


def test_milestones_by_epoch_survive_pruning(tmp_path):
    """--keep_every_epochs: checkpoints at every epoch multiple, saved even when --ckpt_every misses
    them, and never pruned; the others keep only the newest --keep_last."""
    from rectok_fast.training.checkpointer import Checkpointer
    assert Checkpointer.milestone_steps(2, 7, 50) == {14, 28, 42}
    assert Checkpointer.milestone_steps(0.5, 7, 20) == {3, 7, 10, 14, 17}
    assert Checkpointer.milestone_steps(0, 7, 50) == set()
    root = str(tmp_path)
    for step in (3, 6, 7, 9, 12, 14, 15):
        d = tmp_path / R.tag_for(step)
        d.mkdir()
        (d / "x.pt").write_bytes(b"x")
        R.mark_complete(root, R.tag_for(step), {"step": step, "milestone": step in (7, 14)})
        R.prune(root, keep_last=1)
    assert R.list_tags(root) == ["step_00000007", "step_00000014", "step_00000015"]


def _run(argv, hooks=None):
    from rectok_fast.training.trainer import run
    return run(C.parse_config(argv), hooks=hooks)


def test_nonfinite_gradients_skip_then_stop(tmp_path):
    """A NaN loss (injected through the hooks, so the NaN really flows into the gradients) skips the
    update, is counted, and --max_bad_steps in a row stop the run."""
    from train_hooked import NonFiniteAt
    from rectok_fast.training.trainer import TrainingDiverged
    out = str(tmp_path / "nan")
    argv = ["--preset", "tiny", "--stage", "dit", "--no_progress", "--seed", "4"]
    res = _run(argv + ["--max_steps", "3", "--output_dir", out], hooks=NonFiniteAt({1}))
    assert res["bad_steps"] == 1 and res["steps"] == 3
    final = torch.load(os.path.join(out, "final.pth"), weights_only=True)
    for key in ("model", "model_ema"):
        assert all(torch.isfinite(v).all() for v in final[key].values()), key
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        _run(argv + ["--max_steps", "6", "--max_bad_steps", "3", "--output_dir", out + "2"],
             hooks=NonFiniteAt({0, 1, 2, 3}, value=float("inf")))


def test_self_describing_checkpoints_name_the_tokenizer_variant(tmp_path):
    """--tokenizer_ckpt (dit) / --load_from (decoder_ft) written by us name their variant: it becomes the
    run's tokenizer unless --tokenizer / --model says otherwise; an image-size mismatch is refused early."""
    from rectok_fast.checkpoint import export_official_checkpoint
    from rectok_fast.models.registry import build_model
    path = str(tmp_path / "tok.pth")
    export_official_checkpoint(build_model("rectok_tiny", img_size=32), path)
    d = C.parse_config(["--stage", "dit", "--preset", "official", "--tokenizer_ckpt", path, "--img_size", "32"])
    assert d.model.tokenizer == "rectok_tiny_decft" and dict(d.model.tokenizer_overrides) == {"img_size": 32}
    assert d.model.overrides["in_channels"] == 16 and d.model.overrides["input_size"] == 2
    f = C.parse_config(["--stage", "decoder_ft", "--preset", "official", "--load_from", path, "--img_size", "32"])
    assert f.model.variant == "rectok_tiny_decft"
    with pytest.raises(C.ConfigError, match="32 px images .*pass --img_size 32"):
        C.resolve(C.build_parser().parse_args(["--stage", "dit", "--preset", "official", "--tokenizer_ckpt", path]))
