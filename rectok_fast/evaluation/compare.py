"""``evaluate fid A B`` and ``evaluate stats FOLDER OUT.npz``: FID between folders and/or statistics files."""
from __future__ import annotations

import os

from rectok_fast.evaluation import data_io, fidelity
from rectok_fast.evaluation.fidelity import EvalError


def _side(path, net, batch_size) -> dict:
    """{'stats', 'features' (dict) or None} of a folder or a statistics file."""
    if fidelity.is_stats_file(path):
        loaded = fidelity.load_stats(path)
        feats = {fidelity.FEATURE_FID: loaded["features"]} if "features" in loaded else None
        return {"stats": loaded, "features": feats, "folder": False}
    if not os.path.isdir(path):
        raise EvalError(f"{path!r} is neither a folder of images nor a .npz statistics file")
    feats = fidelity.features_of_folder(net, path, batch_size)
    return {"stats": fidelity.stats_from_features(feats), "features": feats, "folder": True}


def fid_between(a, b, inception_weights, device="cpu", batch_size: int = 64) -> dict:
    """FID of A vs B; IS of the first folder among (A, B); precision/recall (A = generated, B = real)
    when both sides have features (folders, or .npz files written with features)."""
    needs_net = not (fidelity.is_stats_file(a) and fidelity.is_stats_file(b))
    net = fidelity.load_inception(inception_weights, device) if needs_net else None
    sa, sb = _side(a, net, batch_size), _side(b, net, batch_size)
    out = {"fid": fidelity.fid_from_stats(sa["stats"], sb["stats"]), "is_mean": None, "is_std": None,
           "precision": None, "recall": None}
    for side in (sa, sb):
        if side["folder"]:
            n = side["features"][fidelity.FEATURE_IS].shape[0]
            if n >= fidelity.IS_SPLITS:
                out["is_mean"], out["is_std"] = fidelity.inception_score(side["features"])
            else:
                out["notes"] = [f"no Inception Score: its {fidelity.IS_SPLITS} splits need at least "
                                f"{fidelity.IS_SPLITS} images, the folder has {n}"]
            break
    if sa["features"] is not None and sb["features"] is not None:
        out["precision"], out["recall"] = fidelity.precision_recall(sa["features"][fidelity.FEATURE_FID],
                                                                    sb["features"][fidelity.FEATURE_FID])
    return out


def write_folder_stats(folder, out_path, inception_weights, device="cpu", batch_size: int = 64,
                       with_features: bool = False) -> dict:
    if not os.fspath(out_path).lower().endswith(".npz"):
        raise EvalError(f"the statistics file must end in .npz, got {out_path!r}")
    net = fidelity.load_inception(inception_weights, device)
    feats = fidelity.features_of_folder(net, folder, batch_size)
    stats = fidelity.stats_from_features(feats)
    fidelity.save_stats(out_path, stats, feats[fidelity.FEATURE_FID] if with_features else None)
    return {"stats": os.path.abspath(out_path), "num_images": int(feats[fidelity.FEATURE_FID].shape[0]),
            "with_features": bool(with_features)}


def run_fid(args) -> dict:
    from rectok_fast.evaluation.dist import setup
    _, _, device = setup(args.device)
    return fid_between(args.a, args.b, args.inception_weights, device, args.inception_bsz)


def run_stats(args) -> dict:
    from rectok_fast.evaluation.dist import setup
    _, _, device = setup(args.device)
    out = write_folder_stats(args.folder, args.out, args.inception_weights, device, args.inception_bsz,
                             args.with_features)
    data_io.log(f"wrote {out['stats']} ({out['num_images']} images)")
    return out
