"""bf16 with the official numerics: fp32 weights and EMA, bf16 autocast compute, fp32 gradient reduction.

* What DeepSpeed really does with each precision config (2 gloo processes, ZeRO-0..3): the repo's
  ds.json (``torch_autocast``, no lower-precision modules) keeps fp32 parameters and gradients and
  reduces in fp32; the ``bf16`` section (tests/data/ds_bf16_params.json) keeps bf16 parameters and
  gradients with an fp32 master. DeepSpeed's default autocast module list is the control: it reduces
  Linear/Conv gradients in bf16, which the probe must see.
* Every stage runs to the end in bf16 through DeepSpeed (final images, export), and its
  ``model_ema`` equals an EMA replayed here from the fp32 weights saved after every step.
* Stage 2 keeps the frozen encoder outside the engine: bit-unchanged under the bf16 section and ZeRO-3
  (inside the engine it would have been cast to bf16 and partitioned).
Launch helpers from tests/test_train_distributed.py; this file uses ports 29851+.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from test_train_distributed import DS, ROOT, _env, launch

BF16_SECTION = os.path.join(ROOT, "tests", "data", "ds_bf16_params.json")
TINY = ["--preset", "tiny", "--batch_size", "2", "--precision", "bf16", "--no_progress"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ds_config(tmp_path, base: str, stage: int) -> str:
    """``base`` (ds.json or the bf16-section file) at ZeRO ``stage``."""
    with open(base) as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"] = {"stage": stage}
    path = tmp_path / f"ds_{os.path.basename(base)}_{stage}"
    path.write_text(json.dumps(cfg))
    return str(path)


def _exports(out_dir: str) -> list[dict]:
    """The official-format export of every checkpoint (one per step with --ckpt_every 1), in step order."""
    root = os.path.join(out_dir, "checkpoints")
    tags = sorted(t for t in os.listdir(root) if t.startswith("step_"))
    return [_load(os.path.join(root, t, "official.pth")) for t in tags]


def _replay_ema(exports: list[dict], decay: float, bf16_copies: bool = False) -> dict:
    """EMA replayed from the exported fp32 'model' of steps 2..N, starting at the exported EMA of step 1.
    Frozen parameters are copied, as the EMA does: they never change and their EMA equals them at every
    step (a trainable parameter that gets no gradient, e.g. stage 2's unused mask token, still averages)."""
    ema = {k: v.clone() for k, v in exports[0]["model_ema"].items()}
    frozen = {k for k in ema if all(torch.equal(e["model"][k], exports[0]["model"][k])
                                    and torch.equal(e["model_ema"][k], e["model"][k]) for e in exports)}
    for ex in exports[1:]:
        for k in ema:
            p = ex["model"][k].float()
            if bf16_copies:
                p = p.bfloat16().float()
            ema[k] = p.clone() if k in frozen else torch.lerp(ema[k], p, 1.0 - decay)
    return ema


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _check_ema_is_fp32_master_average(out_dir: str, decay: float, steps: int) -> None:
    exports = _exports(out_dir)
    assert len(exports) == steps
    final = _load(os.path.join(out_dir, "final.pth"))
    assert set(final["model_ema"]) <= set(final["model"])
    assert all(v.dtype == torch.float32 for k in ("model", "model_ema") for v in final[k].values()
               if v.is_floating_point())
    # the exported weights are the fp32 values the optimizer updates, not bf16 copies
    trained = [k for k in final["model"] if not torch.equal(final["model"][k], exports[0]["model"][k])]
    assert trained
    assert any(not torch.equal(final["model"][k], final["model"][k].bfloat16().float()) for k in trained)
    replay = _replay_ema(exports, decay)
    err = _max_diff(replay, final["model_ema"])
    assert err <= 1e-7, err
    # the check can fail: an EMA of the bf16 copies is far away
    assert _max_diff(_replay_ema(exports, decay, bf16_copies=True), final["model_ema"]) > 100 * max(err, 1e-9)


def _check_export_loads_fp32(path: str) -> None:
    from rectok_fast.checkpoint import build_from_checkpoint
    for which in ("model", "model_ema"):
        model, _ = build_from_checkpoint(path, which=which)
        assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------ configs
def test_precision_modes_from_ds_configs():
    from rectok_fast.training.engine import (AUTOCAST, BF16_PARAMS, FP32, ds_wants_bf16, finalize_ds_config,
                                             load_ds_config, precision_mode)
    shipped, section = load_ds_config(os.path.join(ROOT, "ds.json")), load_ds_config(BF16_SECTION)
    assert ds_wants_bf16(shipped) and ds_wants_bf16(section) and ds_wants_bf16(None)
    assert not ds_wants_bf16({"bf16": {"enabled": False}})
    assert precision_mode(shipped, True) == AUTOCAST and precision_mode(None, True) == AUTOCAST
    assert precision_mode(section, True) == BF16_PARAMS and precision_mode(section, False) == FP32
    cfg = finalize_ds_config(shipped, 4, 3.0, True)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert cfg["bf16"]["enabled"] is False
    cfg = finalize_ds_config(section, 4, 3.0, True)
    assert cfg["bf16"]["enabled"] is True and cfg["communication_data_type"] == "fp32" and "torch_autocast" not in cfg
    for base in (shipped, section):        # the discriminator's engine: fp32, no autocast
        cfg = finalize_ds_config(base, 4, 3.0, False)
        assert cfg["bf16"]["enabled"] is False and "torch_autocast" not in cfg
    with pytest.raises(ValueError, match="bfloat16"):
        finalize_ds_config({"torch_autocast": {"enabled": True, "dtype": "float16"}}, 4, 3.0, True)


def test_trainable_view_holds_only_trainable_parts():
    from rectok_fast.models import registry
    from rectok_fast.training.engine import TrainableView, trainable_submodules
    model = registry.build_model("rectok_tiny_decft").eval()
    model.freeze_everything_but_decoder()
    view = TrainableView(model)
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.decoder.parameters()}
    assert not any(n.startswith("encoder") for n, _ in view.named_modules())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(view(x).recon, model(x).recon, rtol=0, atol=0)
    assert [p for p, _ in trainable_submodules(torch.nn.Linear(2, 2))] == [""]
    mixed = torch.nn.Linear(2, 2)
    mixed.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        trainable_submodules(torch.nn.Sequential(mixed))


def test_ema_refuses_bf16_copies():
    from rectok_fast.training.ema import EMA
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, 0.5)
    m.bfloat16()
    with pytest.raises(TypeError, match="fp32"):
        ema.update(m)


def test_inference_with_bf16_weights():
    """DeepSpeed's bf16 section casts the parameters (stage 2: the decoder only) and leaves fp32
    buffers (the RoPE table): reconstruct / detokenize / sampling must still run, in fp32 out."""
    from rectok_fast.flow import sample_latents
    from rectok_fast.models import registry
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for part in ("all", "decoder"):
        model = registry.build_model("rectok_tiny_decft").eval()
        ref = model.reconstruct(x)
        for p in (model if part == "all" else model.decoder).parameters():
            p.data = p.data.bfloat16()
        out = model.reconstruct(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert (out - ref).abs().max() < 0.1, part
    dit = registry.build_model("ditdh_tiny", input_size=4, in_channels=16, num_classes=10).bfloat16()
    z = sample_latents(dit, torch.arange(2), num_steps=3, generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


# ------------------------------------------------------------------------------- DeepSpeed, 2 procs
@pytest.mark.slow
def test_deepspeed_reduces_fp32_gradients_with_ds_json():
    import subprocess
    r = subprocess.run([DS, "--num_gpus", "2", "--master_port", "29851",
                        os.path.join(ROOT, "tests", "_ds_precision_probe.py")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [json.loads(line[len("PROBE "):]) for line in r.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(rows) == 9
    for row in rows:
        assert row["out"] == "torch.bfloat16" and row["master"] == ["torch.float32"], row
        assert not row["master_is_bf16_representable"], row      # the EMA/export read a real fp32 master
        if row["config"] == "ds.json":
            assert row["params"] == row["grads"] == row["grad_collectives"] == ["torch.float32"], row
        elif row["config"].endswith("ds_bf16_params.json"):
            assert row["params"] == row["grads"] == ["torch.bfloat16"], row
            assert row["grad_collectives"] == ["torch.float32"], row          # communication_data_type
        else:   # DeepSpeed's default lower-precision list: Linear/Conv gradients reduced in bf16
            assert "torch.bfloat16" in row["grad_collectives"], row


@pytest.mark.slow
@pytest.mark.parametrize("zero, base, port", [(2, "ds.json", 29852), (3, "ds.json", 29853)])
def test_tokenizer_bf16_deepspeed_to_the_end(tmp_path, zero, base, port):
    out = str(tmp_path / "run")
    cfg = _ds_config(tmp_path, os.path.join(ROOT, base), zero)
    launch(2, port, TINY + ["--stage", "tokenizer", "--max_steps", "3", "--ckpt_every", "1", "--keep_last", "10",
                            "--ema_decay", "0.5", "--deepspeed_config", cfg, "--output_dir", out], timeout=900)
    assert os.path.exists(os.path.join(out, "recon_grid.png"))
    _check_ema_is_fp32_master_average(out, 0.5, 3)
    _check_export_loads_fp32(os.path.join(out, "final.pth"))


@pytest.mark.slow
def test_decoder_ft_bf16_section_zero3_keeps_frozen_encoder_fp32(tmp_path):
    """The bf16 section would cast, and ZeRO-3 partition, anything inside the engine: the encoder
    stays bit-identical to the stage-1 fp32 weights (which are not bf16-representable)."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import run
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    run(parse_config(["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "2",
                      "--output_dir", s1, "--no_progress"]))
    launch(2, 29854, TINY + ["--stage", "decoder_ft", "--max_steps", "3", "--ckpt_every", "1", "--keep_last", "10",
                             "--ema_decay", "0.5", "--load_from", os.path.join(s1, "final.pth"),
                             "--deepspeed_config", _ds_config(tmp_path, BF16_SECTION, 3), "--output_dir", s2],
           timeout=900)
    assert os.path.exists(os.path.join(s2, "recon_grid.png"))
    a, b = _load(os.path.join(s1, "final.pth")), _load(os.path.join(s2, "final.pth"))
    enc = [k for k in b["model"] if k.startswith("encoder.")]
    assert enc
    assert any(not torch.equal(a["model"][k], a["model"][k].bfloat16().float()) for k in enc)
    for k in enc:
        assert b["model"][k].dtype == torch.float32 and torch.equal(b["model"][k], a["model"][k]), k
    _check_ema_is_fp32_master_average(s2, 0.5, 3)
    _check_export_loads_fp32(os.path.join(s2, "final.pth"))


@pytest.mark.slow
def test_dit_bf16_section_zero2_to_the_end(tmp_path):
    out = str(tmp_path / "dit")
    launch(2, 29855, TINY + ["--stage", "dit", "--max_steps", "3", "--ckpt_every", "1", "--keep_last", "10",
                             "--ema_decay", "0.5", "--deepspeed_config", _ds_config(tmp_path, BF16_SECTION, 2),
                             "--output_dir", out], timeout=900)
    assert os.path.exists(os.path.join(out, "samples_grid.png"))
    _check_ema_is_fp32_master_average(out, 0.5, 3)
    _check_export_loads_fp32(os.path.join(out, "final.pth"))


@pytest.mark.slow
def test_plain_engine_bf16_to_the_end(tmp_path):
    """--precision bf16 without DeepSpeed: fp32 weights under torch.autocast, the same outputs."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import run
    out = str(tmp_path / "plain")
    run(parse_config(TINY + ["--stage", "tokenizer", "--max_steps", "3", "--ckpt_every", "1", "--keep_last", "10",
                             "--ema_decay", "0.5", "--output_dir", out]))
    assert os.path.exists(os.path.join(out, "recon_grid.png"))
    _check_ema_is_fp32_master_average(out, 0.5, 3)
    _check_export_loads_fp32(os.path.join(out, "final.pth"))
