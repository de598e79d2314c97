"""Official checkpoint import/export, safe loading, latent statistics and the demo."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from rectok_fast.checkpoint import (CONFIG_KEY, CheckpointError, atomic_torch_save, build_from_checkpoint,
                                    export_official_checkpoint, load_official_checkpoint, safe_torch_load)
from rectok_fast.latent_stats import (attach_latent_stats, compute_latent_stats, latent_stats_path,
                                      save_latent_stats)
from rectok_fast.models.registry import build_model


def tiny(**kw):
    return build_model("rectok_tiny", **kw)


def test_export_load_round_trip(tmp_path):
    torch.manual_seed(0)
    a, ema = tiny(), tiny()
    path = tmp_path / "ckpt.pth"
    export_official_checkpoint(a, path, ema_model=ema, epoch=7)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    ck = safe_torch_load(path)
    assert set(ck) == {"model", "model_ema", "epoch", CONFIG_KEY} and ck["epoch"] == 7
    assert ck[CONFIG_KEY] == {"kind": "tokenizer", "variant": "rectok_tiny", "overrides": {}, "img_size": 64}
    assert set(ck["model_ema"]) == {n for n, _ in ema.named_parameters()}    # parameters only
    b = tiny()
    load_official_checkpoint(path, b, which="model")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    c = tiny()
    got = load_official_checkpoint(str(path), c, which="model_ema")
    assert got["epoch"] == 7
    for (k, v), (_, w) in zip(ema.state_dict().items(), c.state_dict().items()):
        assert torch.equal(v, w), k
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(a.eval().reconstruct(x), b.eval().reconstruct(x))


def test_build_from_checkpoint_rebuilds_the_variant(tmp_path):
    """Our files name their variant and overrides: the model comes back from the file alone, EMA weights
    by default; a stage-1 file also loads into its decode-only twin; a file without the description
    needs a variant name."""
    torch.manual_seed(1)
    a, ema = tiny(img_size=32), tiny(img_size=32)
    path = tmp_path / "t.pth"
    export_official_checkpoint(a, path, ema_model=ema)
    b, ck = build_from_checkpoint(path)
    assert b.variant_spec == {"kind": "tokenizer", "variant": "rectok_tiny", "overrides": {"img_size": 32}}
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in b.state_dict().items())
    c, _ = build_from_checkpoint(path, "rectok_tiny_decft", which="model")       # image size read off the weights
    assert c.img_size == 32 and not c.use_sem
    assert torch.equal(c.decoder.conv_out.weight, a.decoder.conv_out.weight)
    del ck[CONFIG_KEY]
    with pytest.raises(CheckpointError, match="does not describe its model.*fit rectok_tiny, rectok_tiny_decft"):
        build_from_checkpoint(ck)
    with pytest.raises(CheckpointError, match="fit the registered variant"):
        build_from_checkpoint(ck, "rectok_BB")


def test_ema_may_lack_persistent_buffers_only():
    from rectok_fast.losses import RecTokLoss
    loss = RecTokLoss(None)
    params = {k: v.clone() for k, v in loss.named_parameters()}
    load_official_checkpoint({"model_ema": params}, loss, which="model_ema")          # BN stats kept
    with pytest.raises(CheckpointError, match="running_mean"):
        load_official_checkpoint({"model": params}, loss, which="model")
    del params["discriminator.main.0.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+discriminator.main.0.weight"):
        load_official_checkpoint({"model_ema": params}, loss, which="model_ema")


def test_wrong_keys_listed():
    tok = tiny()
    sd = tok.state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    del sd["decoder.conv_out.bias"]
    sd["decoder.mask_token"] = torch.zeros(1, 1, 5)
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint({"model": sd}, tok, which="model")
    msg = str(err.value)
    assert "decoder.conv_out.bias" in msg and "encoder.extra.weight" in msg
    assert "decoder.mask_token: (1, 1, 5) vs (1, 1, 192)" in msg
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        load_official_checkpoint({"optimizer": {}, "epoch": 1}, tok, which="model_ema")


def test_stage1_checkpoint_teacher_keys_are_skipped():
    tok = tiny()
    sd = dict(tok.state_dict())
    sd["sem_foundation_models.dinov3.norm.weight"] = torch.ones(1024)
    load_official_checkpoint({"model": sd}, tok, which="model")
    with pytest.raises(CheckpointError, match="sem_foundation_models"):
        load_official_checkpoint({"model": sd}, tok, which="model", ignore_prefixes=())


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_checkpoint(path, tiny())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        safe_torch_load(tmp_path / "junk.pth")


def test_atomic_save_replaces(tmp_path):
    p = tmp_path / "a" / "x.pt"
    atomic_torch_save({"v": torch.ones(2)}, p)
    atomic_torch_save({"v": torch.zeros(2)}, p)
    assert torch.equal(safe_torch_load(p)["v"], torch.zeros(2))
    assert os.listdir(tmp_path / "a") == ["x.pt"]


def test_latent_stats(tmp_path):
    torch.manual_seed(0)
    tok = build_model("rectok_tiny_decft").train()
    batches = [torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(3)]
    mean, std, count = compute_latent_stats(tok, batches, progress=False)
    assert tok.training and count == 3 * 2 * 16
    with torch.no_grad():
        allm = torch.cat([tok.eval().encode_moments(b) for b in batches]).reshape(-1, 32)[:, :16].double()
    torch.testing.assert_close(mean.double(), allm.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std.double(), allm.std(0, unbiased=False), atol=1e-6, rtol=1e-4)
    ckpt = tmp_path / "tok.pth"
    save_latent_stats(latent_stats_path(ckpt), mean, std, count)
    attach_latent_stats(tok, ckpt)
    torch.testing.assert_close(tok.std.view(-1), std)
    with pytest.raises(FileNotFoundError):
        attach_latent_stats(tok, tmp_path / "other.pth")


def test_demo_writes_png(tmp_path):
    from rectok_fast.demo import main
    with pytest.warns(UserWarning, match="RANDOM"):
        path = main(["--out", str(tmp_path), "--num", "3"])
    from PIL import Image
    assert Image.open(path).size == (3 * 64, 2 * 64)
