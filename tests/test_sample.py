"""rectok-sample CLI: random smoke mode, official-format checkpoint round trip, clear errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rectok_fast import flow, sample
from rectok_fast.checkpoint import CONFIG_KEY, export_official_checkpoint
from rectok_fast.latent_stats import latent_stats_path, save_latent_stats
from rectok_fast.models.registry import build_model

#: the registered tiny DiT^DH with one encoder block (4x4x16 latents of rectok_tiny)
DIT_OVERRIDES = dict(depth=1)


def tiny_dit(**kw):
    return build_model("ditdh_tiny", **{**DIT_OVERRIDES, **kw})


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
    tok = _random_params(build_model("rectok_tiny_decft"), 0)
    dit = _random_params(tiny_dit(), 1)
    guide = _random_params(tiny_dit(), 2)
    paths = {k: str(tmp_path / f"{k}.pth") for k in ("tok", "dit", "guide")}
    # 'model' holds different (raw) weights than 'model_ema': sampling must use the EMA ones.
    raw_tok = _random_params(build_model("rectok_tiny_decft"), 10)
    raw_dit = _random_params(tiny_dit(), 11)
    export_official_checkpoint(raw_tok, paths["tok"], ema_model=tok, epoch=3)       # self-describing files
    export_official_checkpoint(raw_dit, paths["dit"], ema_model=dit, epoch=79)
    export_official_checkpoint(raw_dit, paths["guide"], ema_model=guide, epoch=29)
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
    written, grid = sample.run(["--tokenizer", paths["tok"], "--dit", paths["dit"], "--guide", paths["guide"],
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
    assert ckpt[CONFIG_KEY]["variant"] == "ditdh_tiny" and ckpt[CONFIG_KEY]["overrides"] == DIT_OVERRIDES
    loaded, _ = sample.load_dit(paths["dit"], None, torch.device("cpu"))    # rebuilt from the file alone
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
        sample.load_dit(bad, None, torch.device("cpu"))


def test_config_mismatch_is_a_clear_error(tmp_path, checkpoints):
    paths, _, _, _ = checkpoints
    ckpt = torch.load(paths["dit"], weights_only=True)
    ckpt[CONFIG_KEY]["overrides"]["hidden_size"] = 64
    bad = str(tmp_path / "wrongconf.pth")
    torch.save(ckpt, bad)
    with pytest.raises(sample.SampleError, match=r"(?s)does not fit the model.*pos_embed: \(1, 16, 32\) vs \(1, 16, 64\)"):
        sample.load_dit(bad, None, torch.device("cpu"))


def test_official_file_loads_by_variant_and_a_wrong_one_names_the_right(tmp_path):
    """A file without our self-description (an official one) builds from the variant the user names; a
    wrong name fails with the registered variant whose keys and shapes fit, and the flag to pass it."""
    dit = _random_params(build_model("ditdh_tiny"), 3)
    path = str(tmp_path / "official.pth")
    export_official_checkpoint(dit, path, epoch=1)
    ckpt = torch.load(path, weights_only=True)
    del ckpt[CONFIG_KEY]
    torch.save(ckpt, path)
    loaded, _ = sample.load_dit(path, "ditdh_tiny", torch.device("cpu"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in dit.state_dict().items())
    with pytest.raises(sample.SampleError, match=r"fit the registered variant\(s\) ditdh_tiny: pass --dit_model ditdh_tiny"):
        sample.load_dit(path, "ditdh_s", torch.device("cpu"))
    tok = build_model("rectok_tiny_decft", img_size=32)
    tpath = str(tmp_path / "tok.pth")
    export_official_checkpoint(tok, tpath)
    tck = torch.load(tpath, weights_only=True)
    del tck[CONFIG_KEY]
    torch.save(tck, tpath)
    with pytest.raises(sample.SampleError, match=r"pass --tokenizer_model rectok_(demo|tiny)_decft"):
        sample.load_tokenizer(tpath, "rectok_BB", "auto", torch.device("cpu"))
    assert sample.load_tokenizer(tpath, "rectok_tiny", "auto", torch.device("cpu")).img_size == 32


def test_latent_shape_mismatch(tmp_path, checkpoints, capsys):
    paths, _, _, _ = checkpoints
    other = tiny_dit(in_channels=8)
    path = str(tmp_path / "c8.pth")
    export_official_checkpoint(other, path)
    rc = sample.main(["--tokenizer", paths["tok"], "--tokenizer_model", "rectok_tiny", "--dit", path,
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
    assert sample.main(["--tokenizer", paths["tok"], "--dit", paths["dit"], "--guidance", "autoguidance"] + out) == 2
    assert "needs --guide" in capsys.readouterr().err
    assert sample.main(["--labels", "3,x"] + out) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert sample.main(["--labels", "10"] + out) == 2          # the random smoke DiT (ditdh_tiny) has 10 classes
    assert "outside [0, 9]" in capsys.readouterr().err


def test_label_schedule_cycles_like_official():
    assert sample.parse_labels("all", 4) == [0, 1, 2, 3]
    assert sample.label_schedule([0, 1, 2], 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(sample.SampleError):
        sample.label_schedule([1], 0)


def test_uint8_conversion_truncates():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert sample.to_uint8(x)[0, 0, :, 0].tolist() == [0, 127, 254, 255, 255]
