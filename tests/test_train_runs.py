"""Runs that survive, end to end through the launcher: tokenizer-stage resume after SIGKILL (GAN on:
the discriminator's own engine / optimizer state and the EMA must come back), stage 2 (decoder_ft)
from a stage-1 checkpoint, the latent cache under 2 DeepSpeed processes against the single-process
reference path, and ``--compile`` on CPU. Helpers (and the port convention) from
tests/test_train_distributed.py; this file uses ports 29731+.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from test_train_distributed import HOOKED, _reference, ds_config, launch, metrics

TIMING = ("time", "step_time", "images_per_s")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()), default=0.0)


@pytest.mark.slow
def test_tokenizer_resume_after_sigkill_with_gan_matches_uninterrupted(tmp_path):
    """Stage 1, GAN active from step 0 (two engines: G and D), ZeRO-2, 2 processes. SIGKILL after
    step 5 (complete checkpoint at 3; step 6's never written), --resume, and reproduce the
    uninterrupted run: EVERY logged term (generator losses, discriminator loss / logits, grad norms,
    lr) at every step, and the final model, EMA and discriminator weights. Everything is
    deterministic on CPU/gloo, so any state not restored (D's Adam moments, EMA, data position, RNG)
    shows up as a difference."""
    cfg = ds_config(tmp_path, 2)
    argv = ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "8",
            "--ckpt_every", "3", "--seed", "5", "--disc_start_epoch", "0", "--deepspeed_config", cfg, "--no_progress"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    launch(2, 29731, argv + ["--output_dir", full])
    r = launch(2, 29732, argv + ["--output_dir", cut], env={"RECTOK_FAST_TEST_KILL_AT_STEP": 5}, check=False,
               script=HOOKED)
    assert r.returncode != 0
    assert open(os.path.join(cut, "checkpoints", "latest")).read().strip() == "step_00000003"
    assert sorted(metrics(cut)) == [1, 2, 3, 4, 5]
    r = launch(2, 29733, argv + ["--output_dir", cut, "--resume"])
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    a, b = metrics(full), metrics(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert set(a[s]) == set(b[s]), s
        assert a[s]["discriminator_factor"] == 1.0 and a[s]["discriminator_loss"] > 0   # the GAN really trains
        for k in a[s]:
            if k not in TIMING:
                assert a[s][k] == pytest.approx(b[s][k], rel=1e-5, abs=1e-7), (s, k, a[s][k], b[s][k])
    pa, pb = _load(os.path.join(full, "final.pth")), _load(os.path.join(cut, "final.pth"))
    for key in ("model", "model_ema", "discriminator"):
        assert _max_diff(pa[key], pb[key]) <= 1e-6, key
    # the EMA moved away from the model (decay 0.999 over 8 steps): comparing it is not comparing the model
    assert _max_diff(pa["model"], {k: pa["model_ema"].get(k, v) for k, v in pa["model"].items()}) > 1e-4


@pytest.mark.slow
def test_decoder_ft_from_stage1_checkpoint(tmp_path):
    """Stage 2 through the launcher from a stage-1 final.pth (2 steps, made here): only decoder.*
    changes in 'model'; the decft 'model_ema' encoder equals the stage-1 'model' (non-EMA) encoder
    (frozen params are copied, spec section 4), its decoder keeps averaging from the stage-1 EMA
    decoder; no semantic decoders in the decft model; the usual outputs exist."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import run
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    run(parse_config(["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "2",
                    "--output_dir", s1, "--no_progress"]))
    launch(1, 29734, ["--preset", "tiny", "--stage", "decoder_ft", "--batch_size", "2", "--max_steps", "3",
                      "--load_from", os.path.join(s1, "final.pth"), "--deepspeed_config", ds_config(tmp_path, 2),
                      "--output_dir", s2, "--no_progress"])
    for f in ("final.pth", "recon_grid.png", "loss.png", "metrics.jsonl", "checkpoints/latest"):
        assert os.path.exists(os.path.join(s2, f)), f
    assert sorted(metrics(s2)) == [1, 2, 3]
    a, b = _load(os.path.join(s1, "final.pth")), _load(os.path.join(s2, "final.pth"))
    assert {"model", "model_ema", "discriminator"} <= set(b)
    assert not any(k.startswith("sem_decoders.") for k in list(b["model"]) + list(b["model_ema"]))
    assert set(b["model"]) == {k for k in a["model"] if not k.startswith("sem_decoders.")}
    changed = {k for k in b["model"] if not torch.equal(a["model"][k].float(), b["model"][k].float())}
    assert changed and all(k.startswith("decoder.") for k in changed), sorted(changed)[:5]
    enc = [k for k in b["model"] if k.startswith("encoder.")]
    assert enc
    for k in enc:
        assert torch.equal(b["model_ema"][k], a["model"][k].float()), k              # stage-1 'model' encoder
    assert any(not torch.equal(a["model"][k], a["model_ema"][k]) for k in enc)      # ... which is not its EMA
    dec = [k for k in b["model"] if k.startswith("decoder.")]
    from_ema = max((b["model_ema"][k] - a["model_ema"][k]).abs().max().item() for k in dec)
    from_model = max((b["model_ema"][k] - a["model"][k].float()).abs().max().item() for k in dec)
    assert 0 < from_ema < from_model, (from_ema, from_model)


@pytest.mark.slow
def test_latent_cache_two_processes_match_reference(tmp_path):
    """dit from --latent_cache with 2 DeepSpeed processes (ZeRO-1): the cache is built by the ranks
    together (chunks c = rank, rank + 2, ...), then each rank trains on ITS global-rank column of the epoch plan. The
    single-process --emulate_ranks 2 reference builds its own cache (one shard) and must reproduce
    the losses and weights, across an epoch boundary (16 steps/epoch here; new order and flips)."""
    argv = ["--preset", "tiny", "--stage", "dit", "--batch_size", "2", "--max_steps", "20", "--epochs", "2",
            "--ckpt_every", "0", "--seed", "7", "--latent_cache_dtype", "fp32"]
    ds_out, ref_out = str(tmp_path / "ds"), str(tmp_path / "ref")
    cache2, cache1 = str(tmp_path / "cache2"), str(tmp_path / "cache1")
    r = launch(2, 29735, argv + ["--latent_cache", cache2, "--deepspeed_config", ds_config(tmp_path, 1),
                                 "--output_dir", ds_out, "--no_progress"])
    assert "building the latent cache" in r.stdout
    from rectok_fast.training.latent_cache import LatentCache
    assert len(LatentCache(cache2)) == 64
    _reference(argv + ["--latent_cache", cache1], ref_out)
    a, b = metrics(ds_out), metrics(ref_out)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-4, abs=1e-6), (s, a[s]["loss"], b[s]["loss"])
    pa, pb = _load(os.path.join(ds_out, "final.pth")), _load(os.path.join(ref_out, "final.pth"))
    for key in ("model", "model_ema"):
        assert _max_diff(pa[key], pb[key]) < 2e-4, key
    # the latent stats come from the cache: the same in both runs
    la, lb = _load(os.path.join(ds_out, "latent_stats.pt")), _load(os.path.join(ref_out, "latent_stats.pt"))
    for k in la:
        if torch.is_tensor(la[k]):
            assert torch.allclose(la[k], lb[k], rtol=1e-5, atol=1e-6), k


DIT = ["--preset", "tiny", "--stage", "dit", "--batch_size", "2", "--max_steps", "3", "--seed", "11"]


def test_compile_plain_engine_dit(tmp_path, monkeypatch):
    """--compile in the plain loop: graphs are really compiled (dynamo counters) and the losses equal
    the eager run's. Backend aot_eager (RECTOK_FAST_COMPILE_BACKEND) to keep it cheap on CPU: same
    dynamo trace (custom ops, fake impls, AOT autograd); inductor works here too but costs ~30 s."""
    import torch._dynamo
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import run
    monkeypatch.setenv("RECTOK_FAST_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        res = run(parse_config(DIT + ["--compile", "--output_dir", str(tmp_path / "c"), "--no_progress"]))
    finally:
        torch._dynamo.reset()
    run(parse_config(DIT + ["--output_dir", str(tmp_path / "e"), "--no_progress"]))
    assert res["compiled_graphs"] >= 1
    a, b = metrics(str(tmp_path / "c")), metrics(str(tmp_path / "e"))
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-4), s


@pytest.mark.slow
def test_compile_deepspeed_engine_dit(tmp_path):
    """--compile through the launcher: DeepSpeed engine.compile() (1 process, ZeRO-1), aot_eager."""
    out = str(tmp_path / "ds")
    r = launch(1, 29736, DIT + ["--compile", "--deepspeed_config", ds_config(tmp_path, 1), "--output_dir", out,
                                "--no_progress"], env={"RECTOK_FAST_COMPILE_BACKEND": "aot_eager"})
    assert "DeepSpeed engine.compile()" in r.stdout
    m = re.search(r"torch.compile: (\d+) graph", r.stdout)
    assert m and int(m.group(1)) >= 1, r.stdout[-3000:]
    assert sorted(metrics(out)) == [1, 2, 3] and os.path.exists(os.path.join(out, "final.pth"))


def test_tokenizer_resume_plain_engine_in_process(tmp_path):
    """The plain (no DeepSpeed) engine's checkpoints, G and D: stop after 3 of 6 steps (its final
    checkpoint), --resume to 6, and match an uninterrupted 6-step run exactly. In-process and
    1 process: the cheap check of PlainEngine.save/load that the launcher tests above do not cover."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import run
    argv = ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--seed", "9", "--disc_start_epoch", "0",
            "--no_progress"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run(parse_config(argv + ["--max_steps", "6", "--output_dir", full]))
    run(parse_config(argv + ["--max_steps", "3", "--output_dir", cut]))
    run(parse_config(argv + ["--max_steps", "6", "--output_dir", cut, "--resume"]))
    a, b = metrics(full), metrics(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        for k in a[s]:
            if k not in TIMING:
                assert a[s][k] == pytest.approx(b[s][k], rel=1e-5, abs=1e-7), (s, k, a[s][k], b[s][k])
    pa, pb = _load(os.path.join(full, "final.pth")), _load(os.path.join(cut, "final.pth"))
    for key in ("model", "model_ema", "discriminator"):
        assert _max_diff(pa[key], pb[key]) <= 1e-6, key
