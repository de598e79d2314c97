"""Reconstruct the bundled demo photos and write a PNG grid (top: inputs, bottom: reconstructions).

    python -m rectok_fast.demo --out DIR [--preset rectok_tiny|rectok_BB] [--checkpoint FILE]

Without --checkpoint the tokenizer is RANDOMLY initialised (said loudly): the reconstructions are then
noise, and the demo only shows that the pipeline runs end to end offline.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rectok_fast.demo_data import demo_batch


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """rows of (n, 3, H, W) in [0, 1] -> uint8 HxWx3 image, truncation like the official PNG saving."""
    lines = [torch.cat(list(r), dim=2) for r in rows]
    img = torch.cat(lines, dim=1).clamp(0, 1)
    return (img * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def main(argv=None) -> str:
    from PIL import Image

    from rectok_fast.checkpoint import load_official_checkpoint, safe_torch_load
    from rectok_fast.models.teacher import loud_warning
    from rectok_fast.models.tokenizer import DECODE_ONLY_IGNORED_PREFIXES, PRESETS, build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--preset", default="rectok_tiny", choices=sorted(PRESETS))
    ap.add_argument("--checkpoint", default=None, help="official-format .pth (uses 'model_ema' if present)")
    ap.add_argument("--num", type=int, default=8, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = build_tokenizer(args.preset, teachers={})
    if args.checkpoint:
        ckpt = safe_torch_load(args.checkpoint)
        which = "model_ema" if "model_ema" in ckpt else "model"
        # teachers={}: a stage-1 file's teacher and semantic decoders are not needed to reconstruct
        load_official_checkpoint(ckpt, tok, which=which, strict=True, ignore_prefixes=DECODE_ONLY_IGNORED_PREFIXES)
    else:
        loud_warning(f"demo: {args.preset} has RANDOM weights (no --checkpoint); reconstructions will be noise.")
    tok.eval()
    images = demo_batch(tok.img_size, n=args.num)
    recon = tok.reconstruct(images)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo_{args.preset}.png")
    Image.fromarray(_grid([images * 0.5 + 0.5, recon])).save(path)
    psnr = (-10 * torch.log10(((recon - (images * 0.5 + 0.5).clamp(0, 1)) ** 2).mean((1, 2, 3)))).mean()
    print(f"wrote {path} ({args.num} images, {tok.img_size}px, PSNR {psnr:.2f} dB, {time.time() - t0:.1f}s)")
    return path


if __name__ == "__main__":
    main()
