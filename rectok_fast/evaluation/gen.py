"""Generator quality: N class-balanced samples per guidance scale -> gFID, IS, precision/recall.

As the official evaluation: image ``i`` has class ``i % num_classes`` (N / num_classes per class),
EMA weights, the Euler ODE with ``--steps`` grid points, uint8 = trunc(255 x) PNGs. Each image's
starting noise comes from its own generator seeded by (``--seed``, i), and images are generated in
global batches of ``--eval_bsz`` dealt round-robin to the ranks, so the images do not depend on the
number of ranks. Output is resumable: a batch whose PNGs all exist is skipped, and a folder made with
other settings is refused. Images of scale ``s`` go to ``OUT/scale_<s>/``; metrics use torch-fidelity
(see :mod:`rectok_fast.evaluation.fidelity`); the best scale is the one with the lowest gFID.
"""
from __future__ import annotations

import json
import os

import torch

from rectok_fast import flow
from rectok_fast.evaluation import data_io, fidelity
from rectok_fast.evaluation import dist as edist
from rectok_fast.evaluation.fidelity import EvalError
from rectok_fast.evaluation.image_metrics import to_uint8

MANIFEST = "manifest.json"
INCEPTION_BSZ = 64     # torch-fidelity's batch: reading the folder back in the same batches gives its exact features


def class_schedule(num_images: int, num_classes: int) -> list[int]:
    """Image i -> class i % num_classes (the official cycle; balanced when N is a multiple of num_classes)."""
    if num_images < 1:
        raise EvalError(f"--num_images must be >= 1, got {num_images}")
    return [i % num_classes for i in range(num_images)]


def image_name(i: int, label: int, num_images: int) -> str:
    width = max(6, len(str(num_images - 1)))
    return f"{i:0{width}d}_class{label:04d}.png"


def image_noise(seed: int, index: int, shape) -> torch.Tensor:
    """The starting noise of image ``index``: its own CPU generator, so batching and ranks do not matter."""
    g = torch.Generator().manual_seed((int(seed) & 0xFFFFFFFF) * 1_000_003 + int(index))
    return torch.randn(tuple(shape), generator=g)


def scale_dir(out_dir: str, scale: float) -> str:
    return os.path.join(out_dir, f"scale_{scale:g}")


def check_manifest(folder: str, manifest: dict, rank: int) -> None:
    """Resume only into a folder made with the same settings; rank 0 writes the manifest."""
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise EvalError(f"{folder} holds images made with other settings ({', '.join(diff)} differ); "
                            "use another --out_dir or delete it")
    elif rank == 0:
        os.makedirs(folder, exist_ok=True)
        data_io.write_json(manifest, path)


@torch.no_grad()
def generate_scale(tok, dit, guide, labels: list[int], folder: str, args, scale: float, rank: int, world: int) -> int:
    """Write this rank's missing images of one scale; returns how many were generated."""
    from tqdm.auto import tqdm
    device = next(dit.parameters()).device
    n = len(labels)
    made = 0
    batches = edist.rank_batches(n, args.eval_bsz, rank, world)
    for start, end in tqdm(batches, desc=f"scale {scale:g} rank {rank}", disable=args.no_progress, unit="batch"):
        names = [os.path.join(folder, image_name(i, labels[i], n)) for i in range(start, end)]
        if all(os.path.isfile(p) for p in names):
            continue
        y = torch.tensor(labels[start:end], dtype=torch.long)
        noise = torch.stack([image_noise(args.seed, i, dit.latent_shape) for i in range(start, end)])
        z = flow.sample_latents(dit, y, num_steps=args.steps, guidance=args.guidance, scale=scale,
                                guide_model=guide, interval=tuple(args.interval), noise=noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = tok.detokenize(z)
        u8 = to_uint8(images).cpu()
        for img, path in zip(u8, names):
            if not os.path.isfile(path):
                data_io.save_png_atomic(img, path)
        made += end - start
    return made


def folder_features(net, files: list[str], rank: int, world: int) -> dict:
    """Features of ``files`` (in that order), computed in torch-fidelity's batches of 64 shared over ranks."""
    local_idx, local = [], []
    for start, end in edist.rank_batches(len(files), INCEPTION_BSZ, rank, world):
        local.append(fidelity.features_of_files(net, files[start:end], INCEPTION_BSZ))
        local_idx += list(range(start, end))
    rows = fidelity.concat_features(local) if local else {fidelity.FEATURE_FID: torch.zeros(0, 2048),
                                                           fidelity.FEATURE_IS: torch.zeros(0, 1008)}
    _, rows = edist.gather_rows(torch.tensor(local_idx, dtype=torch.long), rows)
    return rows


def reference_of(args, net, rank: int, world: int) -> dict:
    """{'stats': {mu, sigma}, 'features': (M, 2048) or None} of ``--reference`` (.npz or folder)."""
    ref = args.reference
    if fidelity.is_stats_file(ref):
        loaded = fidelity.load_stats(ref)
        return {"stats": loaded, "features": loaded.get("features")}
    feats = folder_features(net, fidelity.folder_files(ref), rank, world)
    return {"stats": fidelity.stats_from_features(feats), "features": feats[fidelity.FEATURE_FID]}


def scale_metrics(net, folder: str, n: int, reference: dict, rank: int, world: int, prc: bool) -> dict:
    files = fidelity.folder_files(folder)
    if len(files) != n:
        raise EvalError(f"{folder} holds {len(files)} images, expected {n} (stray files in the folder?)")
    feats = folder_features(net, files, rank, world)
    if rank != 0:          # every rank extracts features; the statistics are rank 0's job
        return {}
    out = {"fid": fidelity.fid_from_stats(fidelity.stats_from_features(feats), reference["stats"])}
    out["is_mean"], out["is_std"] = fidelity.inception_score(feats)
    out["precision"] = out["recall"] = None
    if prc and reference["features"] is not None:
        out["precision"], out["recall"] = fidelity.precision_recall(feats[fidelity.FEATURE_FID], reference["features"])
    return out


def run(args) -> dict:
    """``evaluate gen``: generate every scale (resumably), then measure each against the reference."""
    rank, world, device = edist.setup(args.device)
    if not args.metrics:
        net = None
    elif args.reference is None:
        raise EvalError("--reference is required: a statistics .npz (mu, sigma; e.g. ADM's adm_in256_stats.npz) "
                        "or a folder of real images")
    elif not (fidelity.is_stats_file(args.reference) or os.path.isdir(args.reference)):
        raise EvalError(f"--reference {args.reference!r} is neither a .npz statistics file nor a folder")
    else:
        net = fidelity.load_inception(args.inception_weights, device)   # fail before hours of sampling
    if args.guidance is None:
        args.guidance = "autoguidance" if args.guide else "cfg"
    if args.guidance == "autoguidance" and not args.guide:
        raise EvalError("--guidance autoguidance needs --guide (the weak model's checkpoint)")
    from rectok_fast.evaluation.models import load_generation_models
    tok, dit, guide, stats_source = load_generation_models(args, device)
    num_classes = args.num_classes or dit.num_classes
    labels = class_schedule(args.num_images, num_classes)
    if rank == 0:
        data_io.log(f"latent stats: {stats_source}")
        if args.num_images % num_classes:
            data_io.log(f"warning: {args.num_images} images are not a multiple of {num_classes} classes; "
                        "the classes are not exactly balanced")
    results = {}
    for scale in args.scales:
        folder = scale_dir(args.out_dir, scale)
        manifest = {"tokenizer": os.path.abspath(args.tokenizer), "dit": os.path.abspath(args.dit),
                    "guide": os.path.abspath(args.guide) if args.guide else None, "guidance": args.guidance,
                    "scale": scale, "steps": args.steps, "interval": list(args.interval), "seed": args.seed,
                    "num_images": args.num_images, "num_classes": num_classes}
        check_manifest(folder, manifest, rank)
        edist.barrier()
        made = generate_scale(tok, dit, guide, labels, folder, args, scale, rank, world)
        data_io.log(f"rank {rank}: scale {scale:g}: generated {made} images (the rest already existed)")
        edist.barrier()
    if rank == 0:
        for scale in args.scales:
            _save_grid(scale_dir(args.out_dir, scale), labels, args, scale)
    if net is None:
        summary = {"folders": {f"{s:g}": os.path.abspath(scale_dir(args.out_dir, s)) for s in args.scales},
                   "num_images": args.num_images, "world_size": world}
    else:
        reference = reference_of(args, net, rank, world)
        for scale in args.scales:
            folder = scale_dir(args.out_dir, scale)
            results[f"{scale:g}"] = scale_metrics(net, folder, args.num_images, reference, rank, world, args.prc)
        summary = {}
        if rank == 0:
            best = min(results, key=lambda s: results[s]["fid"])
            summary = dict(results[best], best_scale=float(best), scales=results, num_images=args.num_images,
                           reference=os.path.abspath(args.reference), world_size=world)
    if rank == 0:
        data_io.write_json(summary, os.path.join(args.out_dir, "gen.json"))
        data_io.log(f"wrote {os.path.join(args.out_dir, 'gen.json')}")
    edist.shutdown()
    return summary if rank == 0 else {}


def _save_grid(folder, labels, args, scale) -> None:
    n = min(args.grid_images, len(labels))
    if n <= 0:
        return
    from rectok_fast.evaluation.fidelity import load_uint8_file
    imgs = torch.stack([load_uint8_file(os.path.join(folder, image_name(i, labels[i], len(labels))))
                        for i in range(n)])
    # beside the image folder, never inside it (it would be counted as a sample)
    data_io.save_grid(imgs, os.path.join(args.out_dir, f"grid_scale_{scale:g}.png"), cols=8)
