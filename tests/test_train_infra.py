"""Trainer infrastructure with trivial models: schedules, weight-decay groups, EMA (incl. the stage-2
quirk), checkpoint completeness, config validation, NaN skipping, latent cache vs online."""
from __future__ import annotations

import json
import math
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
])
def test_bad_flags_fail_before_work(argv, msg, capsys):
    with pytest.raises(SystemExit):
        C.parse_args(argv + ["--output_dir", "/tmp/never_created_rectok"])
    assert msg in capsys.readouterr().err
    assert not os.path.exists("/tmp/never_created_rectok")


def test_config_precedence():
    a = C.parse_args(["--stage", "dit", "--preset", "official", "--batch_size", "32"])
    assert a.model == "ditdh_xl" and a.lr == 2e-4 and a.end_lr == 2e-5 and a.clip_grad == 1.0
    assert a.ema_decay == 0.9995 and a.batch_size == 32 and a.decay_start_epoch == 40
    t = C.parse_args(["--preset", "official", "--stage", "tokenizer"])
    assert t.lr is None and t.blr == 1e-4 and t.warmup_epochs == 50 and t.disc_start_epoch == 100
    d = C.parse_args([])
    assert d.preset == "demo" and d.model == "rectok_tiny"
    g = C.parse_args(["--stage", "dit", "--preset", "autoguide"])
    assert g.model == "ditdh_s" and g.epochs == 30


def _run(argv):
    from rectok_fast.training.trainer import run
    return run(C.parse_args(argv))


def test_nan_loss_skips_then_stops(tmp_path, monkeypatch):
    from rectok_fast.training.trainer import TrainingDiverged
    out = str(tmp_path / "nan")
    monkeypatch.setenv("RECTOK_FAST_TEST_NAN_AT_STEPS", "1")
    res = _run(["--preset", "tiny", "--stage", "dit", "--max_steps", "3", "--output_dir", out, "--no_progress"])
    assert res["bad_steps"] == 1 and res["steps"] == 3
    monkeypatch.setenv("RECTOK_FAST_TEST_NAN_AT_STEPS", "0,1,2,3")
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        _run(["--preset", "tiny", "--stage", "dit", "--max_steps", "6", "--max_bad_steps", "3",
              "--output_dir", out + "2", "--no_progress"])


def test_latent_cache_matches_online(tmp_path):
    """Same seed, same data: the DiT batches (normalized posterior samples) from the cache equal the
    online ones (cache stored in fp32 here; bf16 storage rounds the moments)."""
    from rectok_fast.training.latent_cache import CacheLoader, LatentCache, build_latent_cache
    from rectok_fast.training.trainer import DiTTask, seed_step
    from rectok_fast.data import TrainLoader, build_source
    import contextlib
    args = C.parse_args(["--preset", "tiny", "--stage", "dit", "--output_dir", str(tmp_path / "o")])
    task = DiTTask(args, torch.device("cpu"), 0, 1, lambda: None)
    src = build_source()
    build_latent_cache(str(tmp_path / "cache"), task.tok, src, args.img_size, 0, 1, 8, "cpu", "fp32",
                       seed=args.seed, progress=False)
    cache = LatentCache(str(tmp_path / "cache"))
    online = TrainLoader(src, args.img_size, 4, seed=args.seed, num_workers=0)
    cached = CacheLoader(cache, 4, 0, 1, args.seed)
    n = 0
    for epoch in (0,):
        for a, b in zip(online.epoch(epoch), cached.epoch(epoch)):
            # the demo source draws a new crop per epoch; the cache holds epoch 0's, so compare epoch 0
            assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["flipped"], b["flipped"])
            seed_step(0, n, 0)
            za = task.latents(a, contextlib.nullcontext)
            seed_step(0, n, 0)
            zb = task.latents(b, contextlib.nullcontext)
            assert torch.allclose(za, zb, atol=1e-5, rtol=1e-5), (za - zb).abs().max()
            n += 1
    assert n == online.steps_per_epoch
