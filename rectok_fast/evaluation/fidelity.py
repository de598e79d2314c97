"""FID, Inception Score and precision/recall through torch-fidelity, with a LOCAL Inception file.

The network is torch-fidelity's own ``inception-v3-compat`` (the TF-FID port); its weights are
read from a file the user names and are never downloaded. Every number is computed by
torch-fidelity's own functions on features extracted the way ``torch_fidelity.calculate_metrics``
extracts them, so our results equal its results on the same inputs:

* FID: ``fid_features_to_statistics`` + ``fid_statistics_to_metric`` on the '2048' features;
* IS: ``isc_features_to_metric`` on 'logits_unbiased' (10 splits, shuffled with seed 2020);
* precision/recall: ``prc_features_to_metric`` on the '2048' Inception features. torch-fidelity's
  default PRC network is VGG-16; the Inception features match ADM's evaluator (the reference of
  the ImageNet numbers). ``calculate_metrics(..., feature_extractor="inception-v3-compat")`` gives
  the same values.

The order of the features matters for IS (its split shuffle is by position): folders are read in
torch-fidelity's order (sorted real paths), in-memory images in the order they are given.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

INCEPTION_NAME = "inception-v3-compat"
FEATURE_FID = "2048"            # pool3; also used for precision/recall
FEATURE_IS = "logits_unbiased"
FEATURES = (FEATURE_FID, FEATURE_IS)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_HELP = (
    "Pass --inception_weights with torch-fidelity's Inception-v3 weights file "
    "(weights-inception-2015-12-05-6726825d.pth, the TF-FID network converted by torch-fidelity). "
    f"Download it once yourself from {INCEPTION_URL} (or copy it from a torch hub cache, "
    "~/.cache/torch/hub/checkpoints/); rectok_fast never downloads anything.")
IS_SPLITS = 10                          # torch-fidelity's (and the official) isc_splits
FOLDER_EXTENSIONS = "png,jpg,jpeg"      # torch-fidelity's default samples_find_ext
_ANCHOR_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight", "fc.bias")


class EvalError(RuntimeError):
    """An evaluation request that cannot be carried out as given (missing files, bad inputs)."""


def _require_torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise EvalError("torch-fidelity is not installed: pip install torch-fidelity==0.4.0") from exc


# ---------------------------------------------------------------------------------------- network
def check_inception_weights(path) -> None:
    """Refuse a missing, unsafe or foreign weights file before torch-fidelity reads it.

    torch-fidelity loads the file with ``weights_only=False``; reading it first with
    ``weights_only=True`` guarantees it holds plain tensors only."""
    from rectok_fast.checkpoint import CheckpointError, safe_torch_load
    if not path:
        raise EvalError(f"the Inception network needs its weights file. {WEIGHTS_HELP}")
    if not os.path.isfile(path):
        raise EvalError(f"Inception weights file {path!r} does not exist. {WEIGHTS_HELP}")
    try:
        state = safe_torch_load(path)
    except CheckpointError as exc:
        raise EvalError(f"Inception weights {path!r}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"Inception weights {path!r} must be a plain state dict of tensors (torch-fidelity's "
                        f"layout). {WEIGHTS_HELP}")
    missing = [k for k in _ANCHOR_KEYS if k not in state]
    if missing:
        raise EvalError(f"Inception weights {path!r} are not in torch-fidelity's {INCEPTION_NAME} layout "
                        f"(missing {missing}). {WEIGHTS_HELP}")


def load_inception(weights_path, device="cpu", features=FEATURES):
    """torch-fidelity's ``inception-v3-compat`` feature extractor with local weights, frozen, eval."""
    _require_torch_fidelity()
    check_inception_weights(weights_path)
    from torch_fidelity.utils import create_feature_extractor
    try:
        net = create_feature_extractor(INCEPTION_NAME, list(features), cuda=False,
                                       feature_extractor_weights_path=os.fspath(weights_path), verbose=False)
    except RuntimeError as exc:    # load_state_dict: wrong shapes / keys
        raise EvalError(f"Inception weights {weights_path!r} do not fit {INCEPTION_NAME}: {exc}") from exc
    return net.to(device)


def net_device(net) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def features_of_uint8(net, images_u8: torch.Tensor) -> dict:
    """{feature name: (B, D) float32 CPU} of a (B, 3, H, W) uint8 batch (any H, W: resized to 299 inside)."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise EvalError(f"Inception input must be a (B, 3, H, W) uint8 tensor, got "
                        f"{tuple(images_u8.shape)} {images_u8.dtype}")
    out = net(images_u8.to(net_device(net)))
    return {k: v.detach().float().cpu() for k, v in net.convert_features_tuple_to_dict(out).items()}


def concat_features(parts: list[dict]) -> dict:
    if not parts:
        raise EvalError("no images were given to the Inception network")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------- folders
def folder_files(folder) -> list[str]:
    """torch-fidelity's sample list of a folder: png/jpg/jpeg directly inside it, sorted real paths."""
    _require_torch_fidelity()
    from torch_fidelity.utils import glob_samples_paths
    if not os.path.isdir(folder):
        raise EvalError(f"image folder {folder!r} does not exist")
    files = glob_samples_paths(os.fspath(folder), False, FOLDER_EXTENSIONS, None, verbose=False)
    if not files:
        raise EvalError(f"no {FOLDER_EXTENSIONS} images directly inside {folder!r} (sub-folders are not searched)")
    return files


def load_uint8_file(path) -> torch.Tensor:
    """(3, H, W) uint8, decoded exactly as torch-fidelity's ImagesPathDataset does."""
    from torch_fidelity.datasets import ImagesPathDataset
    return ImagesPathDataset([path])[0]


def features_of_files(net, files: list[str], batch_size: int = 64) -> dict:
    """Features of image files in the given order, batched as torch-fidelity batches a folder."""
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import get_featuresdict_from_dataset
    if not files:
        raise EvalError("no image files to evaluate")
    cuda = net_device(net).type == "cuda"
    return get_featuresdict_from_dataset(ImagesPathDataset(list(files)), net, batch_size, cuda,
                                         save_cpu_ram=True, verbose=False)


def features_of_folder(net, folder, batch_size: int = 64) -> dict:
    return features_of_files(net, folder_files(folder), batch_size)


# ------------------------------------------------------------------------------------ statistics
def stats_from_features(feats: dict | torch.Tensor) -> dict:
    """{'mu': (D,), 'sigma': (D, D)} by torch-fidelity (float32 mean, float64 covariance)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    f = feats[FEATURE_FID] if isinstance(feats, dict) else feats
    if f.shape[0] < 2:
        raise EvalError(f"FID statistics need at least 2 images, got {f.shape[0]}")
    return fid_features_to_statistics(f.cpu())


def save_stats(path, stats: dict, features: torch.Tensor | None = None) -> None:
    """Write an ADM-style ``.npz`` with ``mu`` and ``sigma`` (plus the 2048-d ``features`` when given,
    which precision/recall against this reference needs), atomically."""
    path = os.fspath(path)
    arrays = {"mu": np.asarray(stats["mu"]), "sigma": np.asarray(stats["sigma"])}
    if features is not None:
        arrays["features"] = features.cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    from rectok_fast.checkpoint import atomic_write
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def load_stats(path) -> dict:
    """{'mu', 'sigma'[, 'features']} of a statistics ``.npz`` (ADM's ``adm_in256_stats.npz`` or ours)."""
    if not os.path.isfile(path):
        raise EvalError(f"statistics file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise EvalError(f"statistics file {path!r} needs arrays 'mu' and 'sigma', it has {sorted(keys)}")
            out = {"mu": data["mu"], "sigma": data["sigma"]}
            if "features" in keys:
                out["features"] = torch.from_numpy(data["features"])
    except (ValueError, OSError) as exc:
        raise EvalError(f"{path!r} is not a readable .npz statistics file ({exc})") from exc
    d = out["mu"].shape[0] if out["mu"].ndim == 1 else -1
    if out["mu"].ndim != 1 or out["sigma"].shape != (d, d):
        raise EvalError(f"statistics file {path!r}: mu must be (D,) and sigma (D, D), got "
                        f"{out['mu'].shape} and {out['sigma'].shape}")
    return out


def is_stats_file(path) -> bool:
    return os.fspath(path).lower().endswith(".npz")


# --------------------------------------------------------------------------------------- metrics
def fid_from_stats(stats_1: dict, stats_2: dict) -> float:
    """torch-fidelity's FID (eigenvalues of sigma1 @ sigma2; no hand-written matrix square root)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    s1 = {"mu": stats_1["mu"], "sigma": stats_1["sigma"]}
    s2 = {"mu": stats_2["mu"], "sigma": stats_2["sigma"]}
    if s1["mu"].shape != s2["mu"].shape:
        raise EvalError(f"FID statistics differ in size: {s1['mu'].shape} vs {s2['mu'].shape}")
    for key in ("mu", "sigma"):
        if s1[key].dtype != s2[key].dtype:   # e.g. a float64 reference file; torch-fidelity asserts equality
            s1[key], s2[key] = s1[key].astype(np.float64), s2[key].astype(np.float64)
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def inception_score(feats: dict, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) by torch-fidelity with its defaults (shuffle with rng seed 2020)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    logits = feats[FEATURE_IS]
    if logits.shape[0] < splits:
        raise EvalError(f"the Inception Score uses {splits} splits and needs at least {splits} images, "
                        f"got {logits.shape[0]}")
    out = isc_features_to_metric(logits, splits, DEFAULTS["samples_shuffle"], DEFAULTS["rng_seed"])
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


PRC_FULL_MATRIX_BYTES = 8 << 30


def precision_recall(generated: torch.Tensor, real: torch.Tensor, save_cpu_ram: bool | None = None) -> tuple[float, float]:
    """torch-fidelity's PRC (k = 3): precision = generated inside the real manifold, recall = the reverse.

    ``save_cpu_ram`` picks torch-fidelity's blockwise variant (same comparisons, bounded memory); by
    default it is used when the full distance matrices would exceed 8 GiB (50k x 50k needs ~30 GiB)."""
    if save_cpu_ram is None:
        n, m = generated.shape[0], real.shape[0]
        save_cpu_ram = 4 * (n * n + m * m + n * m) > PRC_FULL_MATRIX_BYTES
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    for name, f in (("generated", generated), ("reference", real)):
        if f.shape[0] < 4:
            raise EvalError(f"precision/recall needs at least 4 {name} images (k = 3 neighbours), got {f.shape[0]}")
    out = prc_features_to_metric(generated.float().cpu(), real.float().cpu(), save_cpu_ram=save_cpu_ram, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])
