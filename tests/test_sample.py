"""rectok-sample CLI: random smoke mode, official-format checkpoint round trip, clear errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rectok_fast import flow, sample
from rectok_fast.checkpoint import export_official_checkpoint
from rectok_fast.latent_stats import latent_stats_path, save_latent_stats
from rectok_fast.models.dit import build_dit
from rectok_fast.models.tokenizer import build_tokenizer

DIT_CFG = dict(input_size=4, in_channels=16, hidden_size=32, depth=1, num_heads=2,
               head_hidden_size=32, head_depth=1, head_num_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is much faster on a shared CPU; the CLI's random mode also sets it. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_params(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny tokenizer / DiT / guide written in the official layout ('model' + 'model_ema' w/o buffers).
    Built once per module: tests must not modify these files (copy them instead)."""
    tmp_path = tmp_path_factory.mktemp("ckpt")
    tok = _random_params(build_tokenizer("rectok_tiny", teachers={}), 0)
    dit = _random_params(build_dit("ditdh_s", **DIT_CFG), 1)
    guide = _random_params(build_dit("ditdh_s", **DIT_CFG), 2)
    paths = {k: str(tmp_path / f"{k}.pth") for k in ("tok", "dit", "guide")}
    # 'model' holds different (raw) weights than 'model_ema': sampling must use the EMA ones.
    raw_tok = _random_params(build_tokenizer("rectok_tiny", teachers={}), 10)
    raw_dit = _random_params(build_dit("ditdh_s", **DIT_CFG), 11)
    export_official_checkpoint(raw_tok, paths["tok"], ema_model=tok, epoch=3)
    export_official_checkpoint(raw_dit, paths["dit"], ema_model=dit, dit_config=DIT_CFG, epoch=79)
    export_official_checkpoint(raw_dit, paths["guide"], ema_model=guide, dit_config=DIT_CFG, epoch=29)
    mean, std = torch.randn(16) * 0.1, torch.rand(16) + 0.5
    save_latent_stats(latent_stats_path(paths["tok"]), mean, std)
    tok.set_latent_stats(mean, std)
    return paths, tok, dit, guide


def _read(path):
    return np.asarray(Image.open(path))


def test_random_mode_runs_and_warns(tmp_path, capsys):
    out = tmp_path / "s"
    rc = sample.main(["--out-dir", str(out), "--num-images", "3", "--steps", "4", "--labels", "5,7",
                      "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "images written are NOISE" in err and "RANDOM MODELS" in err
    files = sorted(os.listdir(out))
    assert files == ["000000_class0005.png", "000001_class0007.png", "000002_class0005.png", "grid.png"]
    img = _read(out / files[0])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert _read(out / "grid.png").shape == (2 + 66, 2 + 3 * 66, 3)


def test_random_mode_autoguidance_and_seed_repeatability(tmp_path):
    args = ["--num-images", "2", "--steps", "3", "--guidance", "autoguidance", "--scale", "1.29", "--no-progress"]
    assert sample.main(args + ["--out-dir", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert sample.main(args + ["--out-dir", str(tmp_path / "b"), "--seed", "1"]) == 0
    for name in ("000000_class0000.png", "000001_class0001.png"):
        assert np.array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))


def test_checkpoint_round_trip_reproduces_in_memory_sampling(tmp_path, checkpoints):
    paths, tok, dit, guide = checkpoints
    out = tmp_path / "out"
    written, grid = sample.run(["--tokenizer", paths["tok"], "--tokenizer-model", "rectok_tiny",
                                "--dit", paths["dit"], "--dit-model", "ditdh_s", "--guide", paths["guide"],
                                "--scale", "1.5", "--labels", "3,9", "--num-images", "3", "--batch-size", "2",
                                "--steps", "4", "--seed", "11", "--out-dir", str(out), "--no-progress"])
    assert len(written) == 3 and os.path.isfile(grid)
    gen = torch.Generator().manual_seed(11)
    want = []
    for y in (torch.tensor([3, 9]), torch.tensor([3])):
        z = flow.sample_latents(dit, y, num_steps=4, guidance="autoguidance", scale=1.5, guide_model=guide,
                                generator=gen)
        with torch.inference_mode():
            want.append(sample.to_uint8(tok.detokenize(z)))
    want = torch.cat(want).numpy()
    got = np.stack([_read(p) for p in written])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1     # trunc(255 x) of identical math


def test_official_layout_of_exported_dit(checkpoints):
    paths, _, dit, _ = checkpoints
    ckpt = torch.load(paths["dit"], weights_only=True)
    assert set(ckpt["model"]) == set(dit.state_dict())
    assert set(ckpt["model_ema"]) == {n for n, _ in dit.named_parameters()}
    assert set(ckpt["model"]) - set(ckpt["model_ema"]) == {
        "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin", "dec_feat_rope.freqs_cos", "dec_feat_rope.freqs_sin"}
    assert "pos_embed" in ckpt["model_ema"] and "t_embedder.W" in ckpt["model_ema"]
    loaded, _ = sample.load_dit(paths["dit"], "ditdh_s", torch.device("cpu"))
    for k, v in dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mismatched_keys_are_listed(tmp_path, checkpoints):
    paths, _, dit, _ = checkpoints
    ckpt = torch.load(paths["dit"], weights_only=True)
    del ckpt["model_ema"]["blocks.0.attn.qkv.bias"]
    ckpt["model_ema"]["blocks.0.extra"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pth")
    torch.save(ckpt, bad)
    with pytest.raises(sample.SampleError, match=r"(?s)bad\.pth.*blocks\.0\.attn\.qkv\.bias.*blocks\.0\.extra"):
        sample.load_dit(bad, "ditdh_s", torch.device("cpu"))


def test_config_mismatch_is_a_clear_error(tmp_path, checkpoints):
    paths, _, _, _ = checkpoints
    ckpt = torch.load(paths["dit"], weights_only=True)
    ckpt["dit_config"] = {**DIT_CFG, "hidden_size": 64}
    bad = str(tmp_path / "wrongconf.pth")
    torch.save(ckpt, bad)
    with pytest.raises(sample.SampleError, match=r"(?s)does not fit the model.*pos_embed: \(1, 16, 32\) vs \(1, 16, 64\)"):
        sample.load_dit(bad, "ditdh_s", torch.device("cpu"))


def test_latent_shape_mismatch(tmp_path, checkpoints, capsys):
    paths, _, _, _ = checkpoints
    other = build_dit("ditdh_s", **{**DIT_CFG, "in_channels": 8})
    path = str(tmp_path / "c8.pth")
    export_official_checkpoint(other, path, dit_config={**DIT_CFG, "in_channels": 8})
    rc = sample.main(["--tokenizer", paths["tok"], "--tokenizer-model", "rectok_tiny", "--dit", path,
                      "--out-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "latent shape mismatch" in err and "(16, 4, 4)" in err and "(8, 4, 4)" in err


def test_missing_files_and_bad_combinations(tmp_path, checkpoints, capsys):
    paths, _, _, _ = checkpoints
    out = ["--out-dir", str(tmp_path / "o")]
    assert sample.main(["--tokenizer", paths["tok"], "--dit", str(tmp_path / "nope.pth")] + out) == 2
    assert "DiT checkpoint not found" in capsys.readouterr().err
    assert sample.main(["--dit", paths["dit"]] + out) == 2
    assert "--tokenizer is missing" in capsys.readouterr().err
    assert sample.main(["--tokenizer", paths["tok"], "--dit", paths["dit"], "--tokenizer-model", "rectok_tiny",
                        "--dit-model", "ditdh_s", "--guidance", "autoguidance"] + out) == 2
    assert "needs --guide" in capsys.readouterr().err
    assert sample.main(["--labels", "3,x"] + out) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert sample.main(["--labels", "1000"] + out) == 2
    assert "outside [0, 999]" in capsys.readouterr().err


def test_label_schedule_cycles_like_official():
    assert sample.parse_labels("all", 4) == [0, 1, 2, 3]
    assert sample.label_schedule([0, 1, 2], 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(sample.SampleError):
        sample.label_schedule([1], 0)


def test_uint8_conversion_truncates():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert sample.to_uint8(x)[0, 0, :, 0].tolist() == [0, 127, 254, 255, 255]
