"""Tokenizer reconstruction quality: PSNR, SSIM, LPIPS, rFID and IS of the reconstructions.

rFID compares the reconstructions with the SAME real images (both through Inception), the IS is
that of the reconstructions. Per-image numbers are averaged over images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rectok_fast.evaluation import fidelity
from rectok_fast.evaluation import image_metrics as im

PER_IMAGE = ("psnr", "psnr_float", "ssim", "lpips")


@dataclass
class ReconParts:
    """Per-image results of one process, in the order the images came (``index`` = global position)."""
    index: list = field(default_factory=list)
    values: dict = field(default_factory=lambda: {k: [] for k in PER_IMAGE})
    feats_real: list = field(default_factory=list)
    feats_recon: list = field(default_factory=list)
    grid: list = field(default_factory=list)      # (index, original u8, reconstruction u8) of the first images

    def rows(self) -> tuple[torch.Tensor, dict]:
        rows = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.values.items() if v}
        if self.feats_real:
            real, recon = fidelity.concat_features(self.feats_real), fidelity.concat_features(self.feats_recon)
            rows.update({f"real_{k}": v for k, v in real.items()})
            rows.update({f"recon_{k}": v for k, v in recon.items()})
        return torch.tensor(self.index, dtype=torch.long), rows


def _as_uint8_batch(batch) -> torch.Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError("each batch must be (B, 3, H, W) images (uint8, or float in [-1, 1]) or a tuple "
                         f"starting with them, got {type(images).__name__}"
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}")
    return images if images.dtype == torch.uint8 else im.pm1_to_uint8(images)


@torch.no_grad()
def reconstruct_batch(tokenizer, images_u8: torch.Tensor, autocast: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> reconstruction in [0, 1] float32 (posterior mean, no masking)."""
    dev = next(tokenizer.parameters()).device
    x = images_u8.to(dev).float() / 127.5 - 1.0          # exactly the loader's ToTensor + Normalize(0.5, 0.5)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        out = tokenizer.reconstruct(x)
    return out.float()


@torch.no_grad()
def reconstruct_and_measure(tokenizer, batches, inception=None, lpips=None, autocast: bool | None = None,
                            grid_images: int = 0, start_index: int = 0, indexed: bool = False) -> ReconParts:
    """Run the tokenizer over ``batches`` and collect per-image metrics and Inception features.

    Batches are uint8 or [-1, 1] images (or tuples starting with them); with ``indexed`` they are
    (global index, images, ...) tuples instead."""
    was_training = tokenizer.training
    tokenizer.eval()
    dev = next(tokenizer.parameters()).device
    autocast = (dev.type == "cuda") if autocast is None else bool(autocast)
    parts = ReconParts()
    pos = start_index
    try:
        for batch in batches:
            if indexed:
                index, batch = batch[0].tolist(), batch[1]
            real = _as_uint8_batch(batch).cpu()
            if not indexed:
                index = list(range(pos, pos + real.shape[0]))
                pos += real.shape[0]
            recon01 = reconstruct_batch(tokenizer, real, autocast)
            recon = im.to_uint8(recon01).cpu()
            parts.index += index
            parts.values["psnr"] += im.psnr_uint8(real, recon).tolist()
            parts.values["psnr_float"] += im.psnr_float(real.to(dev).double() / 255.0, recon01).tolist()
            parts.values["ssim"] += im.ssim_uint8(real.to(dev), recon.to(dev)).tolist()
            if lpips is not None:
                parts.values["lpips"] += im.lpips_uint8(lpips, real, recon).tolist()
            if inception is not None:
                parts.feats_real.append(fidelity.features_of_uint8(inception, real))
                parts.feats_recon.append(fidelity.features_of_uint8(inception, recon))
            for j in range(real.shape[0]):
                if index[j] < grid_images:
                    parts.grid.append((index[j], real[j], recon[j]))
    finally:
        tokenizer.train(was_training)
    return parts


def summarize(index: torch.Tensor, rows: dict, notes: list | None = None) -> dict:
    """Metrics of the gathered rows (sorted by global index)."""
    n = int(index.numel())
    out = {"num_images": n}
    for k in PER_IMAGE:
        out[k] = float(rows[k].mean()) if k in rows and rows[k].numel() else None
    out["rfid"] = out["is_mean"] = out["is_std"] = None
    if f"real_{fidelity.FEATURE_FID}" in rows:
        real = {k[5:]: v for k, v in rows.items() if k.startswith("real_")}
        recon = {k[6:]: v for k, v in rows.items() if k.startswith("recon_")}
        if n >= 2:
            out["rfid"] = fidelity.fid_from_stats(fidelity.stats_from_features(recon),
                                                  fidelity.stats_from_features(real))
        elif notes is not None:
            notes.append("rFID needs at least 2 images")
        if n >= 10:
            out["is_mean"], out["is_std"] = fidelity.inception_score(recon)
        elif notes is not None:
            notes.append("the Inception Score needs at least 10 images (10 splits)")
    return out


def evaluate_reconstruction(tokenizer, images_iter, inception=None, lpips=None, *, autocast: bool | None = None,
                            gather: bool = True) -> dict:
    """PSNR/SSIM (+ LPIPS with an LPIPS net, + rFID/IS with an Inception net from
    :func:`rectok_fast.evaluation.fidelity.load_inception`) of ``tokenizer`` on ``images_iter``.

    ``images_iter`` yields (B, 3, H, W) batches, uint8 or float in [-1, 1] (or tuples starting with
    them, as a training loader gives). Under torch.distributed with ``gather`` every rank passes
    its own shard and all ranks get the metrics of the union. Returns a dict with lower-case keys
    (psnr, psnr_float, ssim, lpips, rfid, is_mean, is_std, num_images); unavailable ones are None.
    """
    from rectok_fast.evaluation import dist as edist
    parts = reconstruct_and_measure(tokenizer, images_iter, inception, lpips, autocast)
    index, rows = parts.rows()
    if gather and edist.is_distributed():
        # local positions are not global ones: give every rank its own index range
        import torch.distributed as tdist
        index = index + tdist.get_rank() * (1 << 40)
        index, rows = edist.gather_rows(index, _with_empty_shapes(rows, inception, lpips))
    return summarize(index, rows)


def _with_empty_shapes(rows: dict, inception, lpips) -> dict:
    """A rank without images still contributes correctly shaped (0, ...) tensors to the gather."""
    if rows:
        return rows
    out = {k: torch.zeros(0, dtype=torch.float64) for k in ("psnr", "psnr_float", "ssim")}
    if lpips is not None:
        out["lpips"] = torch.zeros(0, dtype=torch.float64)
    if inception is not None:
        for side in ("real", "recon"):
            out[f"{side}_{fidelity.FEATURE_FID}"] = torch.zeros(0, 2048)
            out[f"{side}_{fidelity.FEATURE_IS}"] = torch.zeros(0, 1008)
    return out



def run(args) -> dict:
    """``evaluate recon``: a tokenizer checkpoint on an image folder / file list, over all ranks."""
    import os

    from rectok_fast.evaluation import data_io
    from rectok_fast.evaluation import dist as edist
    from rectok_fast.evaluation.models import load_tokenizer
    rank, world, device = edist.setup(args.device)
    inception = fidelity.load_inception(args.inception_weights, device) if args.inception_weights else None
    lpips = (im.load_lpips(args.lpips_vgg_weights, args.lpips_lin_weights, device)
             if (args.lpips_vgg_weights or args.lpips_lin_weights) else None)
    tok = load_tokenizer(args.tokenizer, args.tokenizer_model, args.tokenizer_weights, device)
    samples = data_io.load_samples(args.data_path, args.file_list, args.num_images)
    if rank == 0:
        data_io.log(f"reconstructing {len(samples)} images at {tok.img_size}px on {world} rank(s), "
                    f"evaluation batch {args.eval_bsz} (global){'' if inception else '; no --inception_weights: no rFID/IS'}")
    loader = data_io.rank_loader(samples, tok.img_size, args.eval_bsz, rank, world, args.workers)
    autocast = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    parts = reconstruct_and_measure(tok, loader, inception, lpips, autocast, grid_images=args.grid_images,
                                    indexed=True)
    index, rows = parts.rows()
    index, rows = edist.gather_rows(index, _with_empty_shapes(rows, inception, lpips))
    grid = _gather_grid(parts.grid, args.grid_images)
    notes: list = []
    result = {}
    if rank == 0:         # every rank gathered everything; the statistics are rank 0's job
        result = summarize(index, rows, notes)
        result.update(tokenizer=os.path.abspath(args.tokenizer), world_size=world, eval_bsz=args.eval_bsz)
        if notes:
            result["notes"] = notes
        os.makedirs(args.out_dir, exist_ok=True)
        if grid is not None:
            # pairs side by side: original, reconstruction
            pairs = torch.stack([t for _, a, b in grid for t in (a, b)])
            result["grid"] = data_io.save_grid(pairs, os.path.join(args.out_dir, "recon_grid.png"), cols=8)
        data_io.write_json(result, os.path.join(args.out_dir, "recon.json"))
        data_io.log(f"wrote {os.path.join(args.out_dir, 'recon.json')}")
    edist.shutdown()
    return result


def _gather_grid(local: list, n: int):
    """The first ``n`` (index, original, reconstruction) triples of all ranks, in index order."""
    from rectok_fast.evaluation import dist as edist
    if n <= 0:
        return None
    if edist.is_distributed():
        import torch.distributed as tdist
        everything = [None] * tdist.get_world_size()
        tdist.all_gather_object(everything, local)
        local = [t for part in everything for t in part]
    return sorted(local, key=lambda t: t[0])[:n] or None
