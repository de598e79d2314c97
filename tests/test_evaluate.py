"""rectok_fast.evaluate: metrics equal torch-fidelity's, PSNR/SSIM by hand, gen sharding/resume, probe.

The Inception network is torch-fidelity's ``inception-v3-compat`` with RANDOM weights written by the
test in torch-fidelity's file layout; its batch-norm statistics are calibrated on the test images so
that the features vary from image to image (with the default running stats they would not). Each
Inception forward costs ~0.4 s on one CPU thread (images are resized to 299 px inside), so the test
folders are small: 20 images where an Inception Score is checked (10 splits of 2), 5 for the reference.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

tf = pytest.importorskip("torch_fidelity")
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception  # noqa: E402

from rectok_fast import evaluate  # noqa: E402
from rectok_fast.evaluation import dist as edist  # noqa: E402
from rectok_fast.evaluation import fidelity, gen, probe  # noqa: E402
from rectok_fast.evaluation import image_metrics as im  # noqa: E402

N_IMAGES = 10
N_REFERENCE = 5      # the reference folder: >= 4 images for precision/recall's 3 neighbours


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Nothing may fetch weights from the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _write_images(folder, seed: int, n: int = N_IMAGES, size: int = 24, tint=(0, 0, 0)):
    """n distinct images: a random low-frequency pattern + noise, shifted by ``tint``."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
        img = np.kron(coarse, np.ones((size // 4, size // 4, 1))) + rng.normal(0, 20, (size, size, 3)) + tint
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def _random_inception_state(calibration: torch.Tensor) -> dict:
    """torch-fidelity's Inception with random weights (no file read, nothing downloaded) and its
    batch-norm running statistics set to the statistics of ``calibration`` (uint8 images)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(
            tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(
            tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3(fidelity.INCEPTION_NAME, list(fidelity.FEATURES))
    with torch.no_grad():
        net.fc.weight.mul_(20.0)        # livelier class probabilities: an Inception Score clearly above 1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None        # cumulative average: one pass gives the batch's statistics
        net.train()
        net(calibration)
        net.eval()
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two small folders and an Inception weights file calibrated on them."""
    root = tmp_path_factory.mktemp("fid")
    a = _write_images(root / "a", seed=1, n=2 * N_IMAGES)
    b = _write_images(root / "b", seed=2, n=N_REFERENCE, tint=(40, -30, 10))
    files = fidelity.folder_files(a)[:5] + fidelity.folder_files(b)
    imgs = torch.stack([fidelity.load_uint8_file(p) for p in files])
    weights = str(root / "inception.pth")
    torch.save(_random_inception_state(imgs), weights)
    return {"a": a, "b": b, "weights": weights, "root": root}


def _cli(argv) -> dict:
    """Run ``rectok-eval`` in-process; returns the JSON object on the last line of stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = evaluate.main([str(a) for a in argv])
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, out.getvalue()
    return json.loads(lines[-1])


def _torch_fidelity(a, b, weights, **metrics) -> dict:
    return tf.calculate_metrics(input1=a, input2=b, cuda=False, feature_extractor=fidelity.INCEPTION_NAME,
                                feature_extractor_weights_path=weights, cache=False, verbose=False,
                                save_cpu_ram=True, **metrics)


# ---------------------------------------------------------------------------- FID / IS / PRC vs torch-fidelity
def test_fid_is_prc_equal_torch_fidelity(assets):
    ours = _cli(["fid", assets["a"], assets["b"], "--inception_weights", assets["weights"], "--device", "cpu"])
    ref = _torch_fidelity(assets["a"], assets["b"], assets["weights"], fid=True, isc=True, prc=True)
    assert ref["frechet_inception_distance"] > 1.0          # the folders differ: a test that can fail
    assert ref["inception_score_mean"] > 1.05               # features vary between images
    # same features (same files, order, batches), same torch-fidelity math -> equal up to float printing
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-9, abs=1e-9)
    assert ours["is_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert ours["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-9, abs=1e-12)
    assert ours["precision"] == pytest.approx(ref["precision"], abs=1e-12)
    assert ours["recall"] == pytest.approx(ref["recall"], abs=1e-12)


def test_stats_round_trip_and_self_fid(assets, tmp_path):
    stats_path = tmp_path / "a_stats.npz"
    res = _cli(["stats", assets["b"], stats_path, "--inception_weights", assets["weights"], "--with_features",
                "--device", "cpu"])
    assert res["num_images"] == N_REFERENCE and os.path.isfile(stats_path)
    loaded = fidelity.load_stats(stats_path)
    # the file holds torch-fidelity's statistics of the stored features, bit for bit, in its dtypes
    from torch_fidelity.metric_fid import fid_features_to_statistics
    assert loaded["features"].shape == (N_REFERENCE, 2048) and loaded["features"].std(0).mean() > 0
    ref = fid_features_to_statistics(loaded["features"])
    np.testing.assert_array_equal(loaded["mu"], ref["mu"])
    np.testing.assert_array_equal(loaded["sigma"], ref["sigma"])
    assert loaded["mu"].dtype == ref["mu"].dtype and loaded["sigma"].dtype == ref["sigma"].dtype
    # a folder against its own statistics: ~0. With 5 images the 2048-d covariance has rank 4, so sqrt(eigenvalues) of its round-off leaves ~1e-4 of trace(sigma)
    near_zero = 1e-3 * float(np.trace(loaded["sigma"]))
    self_fid = _cli(["fid", assets["b"], stats_path, "--inception_weights", assets["weights"], "--device", "cpu"])
    assert abs(self_fid["fid"]) < near_zero
    assert self_fid["is_mean"] is None and "at least 10 images" in self_fid["notes"][0]


def test_fid_of_two_statistics_files(tmp_path):
    """No network for two .npz files (small D here: torch-fidelity's eigvals of a 2048^2 product take
    seconds); a float64 reference such as ADM's meets float32 statistics."""
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(0, 1, (50, 8)).astype(np.float32), rng.normal(0.5, 2, (60, 8)).astype(np.float32)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    s1, s2 = (fid_features_to_statistics(torch.from_numpy(f)) for f in (f1, f2))
    fidelity.save_stats(tmp_path / "s1.npz", s1)
    np.savez(tmp_path / "s2.npz", mu=s2["mu"].astype(np.float64), sigma=s2["sigma"])
    res = _cli(["fid", tmp_path / "s1.npz", tmp_path / "s2.npz"])
    as64 = lambda st: {"mu": st["mu"].astype(np.float64), "sigma": st["sigma"]}  # noqa: E731
    want = fid_statistics_to_metric(as64(s1), as64(s2), False)
    assert res["fid"] == pytest.approx(want["frechet_inception_distance"], rel=1e-12) and res["fid"] > 1
    assert res["is_mean"] is None and res["precision"] is None
    assert _cli(["fid", tmp_path / "s1.npz", tmp_path / "s1.npz"])["fid"] == pytest.approx(0, abs=1e-4)


def test_inception_weights_are_required_and_checked(assets, tmp_path):
    with pytest.raises(fidelity.EvalError, match="toshas/torch-fidelity/releases"):
        fidelity.load_inception(None)
    with pytest.raises(fidelity.EvalError, match="does not exist"):
        fidelity.load_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(fidelity.EvalError, match="layout"):
        fidelity.load_inception(tmp_path / "other.pth")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluate.main(["fid", assets["a"], assets["b"]]) == 2
    assert "--inception_weights" in err.getvalue()
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(fidelity.EvalError, match="'mu' and 'sigma'"):
        fidelity.load_stats(bad)


# ---------------------------------------------------------------------------------- PSNR / SSIM by hand
def _ssim_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of HxWxC uint8 images, window by window (7x7, sample covariance), mean over channels."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        vals = []
        for i in range(a.shape[0] - 6):
            for j in range(a.shape[1] - 6):
                x, y = a[i:i + 7, j:j + 7, ch].ravel(), b[i:i + 7, j:j + 7, ch].ravel()
                mx, my = x.mean(), y.mean()
                vx, vy = x.var(ddof=1), y.var(ddof=1)
                cxy = ((x - mx) * (y - my)).sum() / (x.size - 1)
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_psnr_ssim_match_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)          # odd sizes, distinct per sample
    noise = rng.normal(0, [[[[3.0]]], [[[12.0]]], [[[40.0]]]], a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    psnr = im.psnr_uint8(ta, tb)
    ssim = im.ssim_uint8(ta, tb)
    for k in range(3):
        mse = np.mean((a[k].astype(np.float64) - b[k]) ** 2)
        assert psnr[k].item() == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12)
        assert ssim[k].item() == pytest.approx(_ssim_by_hand(a[k], b[k]), rel=1e-10)
    assert psnr[0] > psnr[1] > psnr[2] and ssim[0] > ssim[1] > ssim[2]
    # scikit-image's definition, which the module follows
    from skimage.metrics import structural_similarity
    assert ssim[1].item() == pytest.approx(structural_similarity(a[1], b[1], channel_axis=2, data_range=255), rel=1e-10)
    assert im.psnr_uint8(ta, ta)[0].item() == im.PSNR_MAX_DB and im.ssim_uint8(ta, ta)[0].item() == pytest.approx(1.0)
    with pytest.raises(TypeError, match="uint8"):
        im.psnr_uint8(ta.float(), tb.float())


def test_uint8_conversions():
    x = torch.tensor([0.0, 0.5, 0.99999, 1.0, 1.3, -0.2]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    assert im.to_uint8(x)[0, 0].flatten().tolist() == [0, 127, 254, 255, 255, 0]   # truncation, as the PNGs
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(im.pm1_to_uint8(u8.float() / 127.5 - 1.0), u8)


# ------------------------------------------------------------------------------------- tiny checkpoints
def _tiny_tokenizer_ckpt(path, official: bool = False):
    """A random tiny tokenizer; ours describe their variant, ``official`` ones (no description) do not."""
    from rectok_fast.checkpoint import CONFIG_KEY, export_official_checkpoint
    from rectok_fast.models.tokenizer import build_tokenizer
    torch.manual_seed(3)
    tok = build_tokenizer("rectok_tiny_decft")
    if official:
        tok.variant_spec = None
    export_official_checkpoint(tok, path)
    assert (CONFIG_KEY in torch.load(path, weights_only=True)) != official
    return str(path)


def _tiny_dit_ckpt(path):
    from rectok_fast.checkpoint import export_official_checkpoint
    from rectok_fast.models.dit import build_dit
    torch.manual_seed(4)
    dit = build_dit("ditdh_tiny")
    with torch.no_grad():      # the official init zeroes the output layers: give them values
        for name, p in dit.named_parameters():
            if p.abs().max() == 0 and "norm" not in name:
                p.normal_(0.0, 0.3)
    export_official_checkpoint(dit, path, latent_stats={"mean": torch.zeros(16), "std": torch.ones(16)})
    return str(path)


def _labelled_folder(root, per_class: int, colours, size: int = 64, seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(colours):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            img = np.asarray(colour, np.float64) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, f"class{c}", f"{i}.png"))
    return str(root)


# ---------------------------------------------------------------------------------------------- recon
def test_recon_metrics_by_hand_and_rfid_equals_torch_fidelity(assets, tmp_path):
    from PIL import Image

    from rectok_fast.evaluation.models import load_tokenizer
    ckpt = _tiny_tokenizer_ckpt(tmp_path / "tok.pth")
    data = _labelled_folder(tmp_path / "data", 2, [(200, 40, 40), (40, 40, 200)])
    res = _cli(["recon", "--tokenizer", ckpt, "--data_path", data, "--eval_bsz", "3", "--workers", "0", "--inception_weights", assets["weights"],
                "--out_dir", tmp_path / "out", "--device", "cpu", "--grid_images", "4"])
    assert res["num_images"] == 4 and os.path.isfile(res["grid"])
    assert res["is_mean"] is None and "10 images" in res["notes"][0]     # IS: 10 splits need >= 10 images
    assert json.load(open(tmp_path / "out" / "recon.json"))["psnr"] == pytest.approx(res["psnr"])
    # by hand: the same crops, reconstructed in the same batches of 3, written as PNGs
    tok = load_tokenizer(ckpt)
    from rectok_fast.evaluation.data_io import ImageSet, load_samples
    items = ImageSet(load_samples(data), 64)
    real = torch.stack([items[i][1] for i in range(len(items))])
    recon = torch.cat([(tok.reconstruct(real[s:s + 3].float() / 127.5 - 1) * 255).to(torch.uint8)
                       for s in range(0, 4, 3)])
    psnr = [10 * math.log10(255 ** 2 / np.mean((real[i].numpy().astype(np.float64) - recon[i].numpy()) ** 2))
            for i in range(4)]
    assert res["psnr"] == pytest.approx(np.mean(psnr), rel=1e-9)
    ssim = [_ssim_by_hand(real[i].permute(1, 2, 0).numpy(), recon[i].permute(1, 2, 0).numpy()) for i in range(2)]
    assert im.ssim_uint8(real[:2], recon[:2]).tolist() == pytest.approx(ssim, rel=1e-10)
    for name, batch in (("real", real), ("recon", recon)):
        os.makedirs(tmp_path / name)
        for i, img in enumerate(batch):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    # rFID's inputs: the in-memory uint8 images give torch-fidelity's features of the PNGs read back (the
    # FID of those features is torch-fidelity's function, checked against calculate_metrics above;
    # each FID costs an eigendecomposition of a 2048^2 matrix, so it is not repeated here)
    from rectok_fast.evaluation.recon import reconstruct_and_measure
    net = fidelity.load_inception(assets["weights"])
    parts = reconstruct_and_measure(tok, [real[:3], real[3:]], inception=net)
    for name, feats in (("real", parts.feats_real), ("recon", parts.feats_recon)):
        from_png = fidelity.features_of_folder(net, str(tmp_path / name))
        for key, value in fidelity.concat_features(feats).items():
            # batches of 3 + 1 here vs torch-fidelity's one batch of 4: float round-off only
            torch.testing.assert_close(value, from_png[key], rtol=1e-3, atol=1e-3)
            assert (value - from_png[key].roll(1, 0)).abs().max() > 1e-2     # a wrong pairing would show
    assert res["rfid"] > 0 and math.isfinite(res["rfid"])


def test_evaluate_reconstruction_api_takes_training_batches():
    from rectok_fast.models.tokenizer import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer("rectok_tiny_decft")
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    u8 = im.pm1_to_uint8(x)
    as_float = evaluate.evaluate_reconstruction(tok, [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(2))])
    as_u8 = evaluate.evaluate_reconstruction(tok, [u8[:2], u8[2:]])
    assert as_float["num_images"] == 4 and as_float["rfid"] is None and as_float["lpips"] is None
    assert as_float["psnr"] == pytest.approx(as_u8["psnr"]) and 0 < as_float["ssim"] < 1


# ------------------------------------------------------------------------------------------------ gen
def test_class_schedule_and_rank_batches():
    labels = gen.class_schedule(12, 4)
    assert [labels.count(c) for c in range(4)] == [3, 3, 3, 3]
    for world in (1, 2, 3):
        parts = [edist.rank_batches(10, 4, r, world) for r in range(world)]
        flat = sorted(b for p in parts for b in p)
        assert flat == [(0, 4), (4, 8), (8, 10)]          # every batch once, same batches for any world size
    # per-image noise: independent of the batch it is drawn in
    assert torch.equal(gen.image_noise(0, 7, (2, 3)), gen.image_noise(0, 7, (2, 3)))
    assert not torch.equal(gen.image_noise(0, 7, (2, 3)), gen.image_noise(0, 8, (2, 3)))


def _run_torchrun(args, nproc: int):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    port = str(random.randint(20000, 40000))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
           "-m", "rectok_fast.evaluate"] + [str(a) for a in args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pixels(folder):
    from PIL import Image
    return {f: np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".png")}


@pytest.mark.slow
def test_gen_two_ranks_balanced_resumable_and_world_size_invariant(assets, tmp_path):
    tok, dit = _tiny_tokenizer_ckpt(tmp_path / "tok.pth"), _tiny_dit_ckpt(tmp_path / "dit.pth")
    ref = tmp_path / "ref.npz"
    _cli(["stats", assets["b"], ref, "--inception_weights", assets["weights"], "--with_features", "--device", "cpu"])
    common = ["gen", "--tokenizer", tok, "--dit", dit, "--num_images", 10, "--num_classes", 5, "--eval_bsz", 4, "--steps", 3,
              "--scales", 1.0, 3.0, "--seed", 7, "--device", "cpu", "--no_progress", "--grid_images", 4]
    two = _run_torchrun(common + ["--out_dir", tmp_path / "w2", "--reference", ref,
                                  "--inception_weights", assets["weights"]], nproc=2)
    assert two["world_size"] == 2 and set(two["scales"]) == {"1", "3"}
    assert two["best_scale"] == min((float(s) for s in two["scales"]), key=lambda s: two["scales"][f"{s:g}"]["fid"])
    for key in ("fid", "is_mean", "is_std", "precision", "recall"):
        assert two[key] is not None and math.isfinite(two[key])
    imgs2 = {s: _pixels(tmp_path / "w2" / f"scale_{s}") for s in ("1", "3")}
    names = sorted(imgs2["1"])
    assert len(names) == 10 and [int(n.split("class")[1][:4]) for n in names] == [i % 5 for i in range(10)]
    assert not all(np.array_equal(imgs2["1"][n], imgs2["3"][n]) for n in names)   # the scale matters
    # the features the two ranks gathered are the single-process features of the folder (IS and
    # precision/recall are functions of them; a direct FID would cost another 2048^2 eigendecomposition)
    feats = fidelity.features_of_folder(fidelity.load_inception(assets["weights"]), str(tmp_path / "w2" / "scale_3"))
    assert two["scales"]["3"]["is_mean"] == pytest.approx(fidelity.inception_score(feats)[0], rel=1e-9)
    p, r = fidelity.precision_recall(feats[fidelity.FEATURE_FID], fidelity.load_stats(ref)["features"])
    assert (two["scales"]["3"]["precision"], two["scales"]["3"]["recall"]) == pytest.approx((p, r))

    # one rank, generation only: the same images
    one_args = common + ["--out_dir", tmp_path / "w1", "--no_metrics"]
    _cli(one_args)
    for s in ("1", "3"):
        one = _pixels(tmp_path / "w1" / f"scale_{s}")
        assert sorted(one) == names
        for n in names:
            np.testing.assert_array_equal(one[n], imgs2[s][n], err_msg=f"scale {s} {n}")
    # resume: the batch with a missing image is generated again, identically; only that file is written
    folder = tmp_path / "w1" / "scale_3"
    gone = names[5]
    kept = {n: os.stat(folder / n).st_mtime_ns for n in names if n != gone}
    os.remove(folder / gone)
    _cli(one_args)
    np.testing.assert_array_equal(_pixels(folder)[gone], imgs2["3"][gone])
    assert {n: os.stat(folder / n).st_mtime_ns for n in kept} == kept
    # other settings into the same folder are refused
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluate.main([str(a) for a in one_args + ["--seed", 8]]) == 2
    assert "other settings (seed differ)" in err.getvalue()


@pytest.mark.slow
def test_recon_two_ranks_equal_one_rank(tmp_path):
    ckpt = _tiny_tokenizer_ckpt(tmp_path / "tok.pth")
    data = _labelled_folder(tmp_path / "data", 4, [(200, 40, 40), (40, 40, 200)])
    args = ["recon", "--tokenizer", ckpt, "--data_path", data,
            "--eval_bsz", 3, "--workers", 0, "--device", "cpu"]
    two = _run_torchrun(args + ["--out_dir", tmp_path / "w2"], nproc=2)
    one = _cli(args + ["--out_dir", tmp_path / "w1"])
    assert two["world_size"] == 2 and two["num_images"] == one["num_images"] == 8
    for k in ("psnr", "psnr_float", "ssim"):
        assert two[k] == pytest.approx(one[k], rel=1e-12)


# ---------------------------------------------------------------------------------------------- probe
def test_probe_beats_chance_on_separable_set(tmp_path):
    ckpt = _tiny_tokenizer_ckpt(tmp_path / "tok.pth", official=True)
    data = _labelled_folder(tmp_path / "data", 8, [(220, 30, 30), (30, 220, 30), (30, 30, 220)])
    args = ["probe", "--tokenizer", ckpt, "--data_path", data, "--holdout", 0.25, "--workers", 0, "--device", "cpu",
            "--out_dir", tmp_path / "out"]
    # a file without a self-description is built as the official variant; the error names the one to pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluate.main([str(a) for a in args]) == 2
    assert re.search(r"pass --tokenizer_model rectok_(tiny|demo)_decft", err.getvalue())
    res = _cli(args + ["--tokenizer_model", "rectok_tiny_decft"])
    assert res["num_classes"] == 3 and res["num_test"] == 6 and res["num_train"] == 18
    assert res["top1"] > res["chance"] + 0.3


def test_probe_split_and_recipe_are_fixed():
    labels = [0] * 5 + [1] * 5 + [2] * 3
    train, test = probe.split_indices(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(13)) and not set(train) & set(test)
    assert [sum(labels[i] == c for i in test) for c in range(3)] == [1, 1, 1]
    assert probe.split_indices(labels, 0.2, seed=0) == (train, test)
    # chance-level features: the probe cannot invent a signal
    g = torch.Generator().manual_seed(0)
    feats, y = torch.randn(60, 4, generator=g), torch.arange(60) % 2
    assert probe.probe_accuracy(feats, y, 0.5)["top1"] < 0.8
    with pytest.raises(fidelity.EvalError, match="at least 2"):
        probe.split_indices([0, 1, 1], 0.5, 0)
