"""The README's demo pipeline with no variant flags: tokenizer -> decoder_ft -> dit -> sample -> evaluate.

Every stage runs the real demo preset (the default when no data flag is given) for 2 optimizer steps,
in-process; each later command finds its models from the previous command's self-describing final.pth.
"""
import json
import os

import pytest
import torch

from rectok_fast.training.config import parse_config
from rectok_fast.training.trainer import run

pytestmark = pytest.mark.slow


def _train(out, *flags):
    result = run(parse_config(["--max_steps", "2", "--no_progress", "--num_workers", "0", "--output_dir", str(out),
                               *flags]))
    assert os.path.isfile(os.path.join(out, "final.pth"))
    return result


def test_demo_pipeline_without_variant_flags(tmp_path, capsys):
    tok, decft, dit = tmp_path / "tokenizer_demo", tmp_path / "decoder_ft_demo", tmp_path / "dit_demo"

    r = _train(tok)
    # the demo evaluates on the held-out crops at the end, logs it and prints it
    assert r["eval"] is not None and set(r["eval"]) >= {"val_psnr", "val_ssim", "val_psnr_raw"}
    assert 0 < r["eval"]["val_psnr"] < 100 and -1 <= r["eval"]["val_ssim"] <= 1
    rows = [json.loads(line) for line in open(tok / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and "val_psnr" in rows[-1] and "loss" in rows[-1]
    assert "final evaluation: PSNR" in capsys.readouterr().out
    assert os.path.isfile(tok / "recon_grid.png")

    r = _train(decft, "--stage", "decoder_ft", "--load_from", str(tok / "final.pth"))
    assert r["eval"] is not None
    _train(dit, "--stage", "dit", "--tokenizer_ckpt", str(decft / "final.pth"))

    from rectok_fast import sample
    paths, grid = sample.run(["--dit", str(dit / "final.pth"), "--steps", "4", "--num_images", "4",
                              "--out_dir", str(tmp_path / "samples"), "--no_progress", "--device", "cpu"])
    assert len(paths) == 4 and os.path.isfile(grid)

    from rectok_fast.demo import main as demo
    demo(["--checkpoint", str(decft / "final.pth"), "--out", str(tmp_path / "demo_out")])
    heldout = tmp_path / "demo_out" / "heldout"
    from rectok_fast.evaluate import run as evaluate
    res = evaluate(["recon", "--tokenizer", str(decft / "final.pth"), "--data_path", str(heldout),
                    "--out_dir", str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"])
    assert res["num_images"] == len(os.listdir(heldout / "photos")) == 16
    # the PNG crops read back exactly: the CLI measures what the training-time evaluation measured
    from rectok_fast.checkpoint import build_from_checkpoint
    from rectok_fast.demo_data import heldout_crops
    from rectok_fast.evaluate import evaluate_reconstruction
    model, _ = build_from_checkpoint(str(decft / "final.pth"))
    direct = evaluate_reconstruction(model.eval(), [heldout_crops(model.img_size)], gather=False, autocast=False)
    assert res["psnr"] == pytest.approx(direct["psnr"], abs=1e-6)


def test_heldout_photos_are_not_trained_on():
    from rectok_fast.data.transforms import _demo_photos
    from rectok_fast.demo_data import demo_images_uint8, heldout_crops
    train = _demo_photos()
    held = demo_images_uint8("heldout")
    assert held and train and all(h.shape != t.shape or not (h == t).all() for h in held for t in train)
    assert len(train) + len(held) == len(demo_images_uint8("all"))
    a, b = heldout_crops(32), heldout_crops(32)
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b)     # fixed crops


def test_demo_preset_models_fit_each_other():
    """The dit stage's DiT matches the demo tokenizer's latent grid (8-px patches) with no variant flags."""
    from rectok_fast.models import registry
    t = parse_config(["--output_dir", "unused"])
    d = parse_config(["--stage", "dit", "--output_dir", "unused"])
    tok = registry.full_config(t.model.variant)
    dit = registry.full_config(d.model.variant)
    assert tok["patch_size"] == 8 and dit["input_size"] == t.data.img_size // 8
    # the preset's tokenizer-only values (longer run, slower EMA) stay out of the other stages; a flag wins
    assert (t.schedule.epochs, t.optim.ema_decay, t.evaluation.every_epochs) == (96, 0.996, 32)
    assert (d.schedule.epochs, d.optim.ema_decay) == (48, 0.99)
    assert parse_config(["--output_dir", "unused", "--epochs", "3"]).schedule.epochs == 3
    assert dit["in_channels"] == tok["token_channels"] and dict(d.model.overrides) == {}
    assert t.evaluation.every_epochs > 0 and not t.loss.lpips and not t.loss.convnext
