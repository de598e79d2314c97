"""Reconstruct crops of the HELD-OUT demo photos (never trained on) and write a PNG grid (top: inputs,
bottom: reconstructions), their PSNR/SSIM, and the crops themselves as PNG files for ``rectok-eval recon``.

    python -m rectok_fast.demo --out DIR [--checkpoint runs/decoder_ft_demo/final.pth]
    rectok-eval recon --tokenizer runs/decoder_ft_demo/final.pth --data_path DIR/heldout

Without --checkpoint the tokenizer is RANDOMLY initialised (said loudly): the reconstructions are then
noise, and the demo only shows that the pipeline runs end to end offline.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rectok_fast.demo_data import heldout_crops


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """rows of (n, 3, H, W) in [0, 1] -> uint8 HxWx3 image, truncation like the official PNG saving."""
    lines = [torch.cat(list(r), dim=2) for r in rows]
    img = torch.cat(lines, dim=1).clamp(0, 1)
    return (img * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def write_heldout_folder(root: str, size: int, n: int | None = None) -> str:
    """The held-out crops at ``size`` px as lossless PNGs in ``root/photos/`` (an ImageFolder with one
    class, which ``rectok-eval recon --data_path root`` reads back exactly); returns ``root``."""
    from PIL import Image

    from rectok_fast.evaluation.image_metrics import pm1_to_uint8
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    for i, img in enumerate(pm1_to_uint8(heldout_crops(size, n))):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(root, "photos", f"{i:03d}.png"))
    return root


def main(argv=None) -> str:
    from PIL import Image

    from rectok_fast.evaluate import evaluate_reconstruction
    from rectok_fast.models import registry
    from rectok_fast.models.teacher import loud_warning
    from rectok_fast.sample import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--variant", "--preset", dest="variant", default=None, choices=registry.names("tokenizer"),
                    help="tokenizer variant (default: the checkpoint's own, else rectok_demo)")
    ap.add_argument("--checkpoint", default=None, help="official-format .pth (uses 'model_ema' if present)")
    ap.add_argument("--num", type=int, default=8, help="number of held-out crops in the grid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.checkpoint:
        # the decode-only twin: a stage-1 file's teacher and semantic decoders are not needed to reconstruct
        tok = load_tokenizer(args.checkpoint, args.variant, "auto", torch.device("cpu"))
    else:
        tok = registry.build_model(registry.decode_only_name(args.variant or "rectok_demo"))
        loud_warning(f"demo: {tok.variant_spec['variant']} has RANDOM weights (no --checkpoint); reconstructions "
                     f"will be noise.")
    name = tok.variant_spec["variant"]
    tok.eval()
    images = heldout_crops(tok.img_size)
    metrics = evaluate_reconstruction(tok, [images], gather=False, autocast=False)
    shown = images[:args.num]
    recon = tok.reconstruct(shown)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo_{name}.png")
    Image.fromarray(_grid([shown * 0.5 + 0.5, recon])).save(path)
    folder = write_heldout_folder(os.path.join(args.out, "heldout"), tok.img_size)
    print(f"wrote {path} ({args.num} of {metrics['num_images']} held-out crops, {tok.img_size}px; held-out PSNR "
          f"{metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}; {time.time() - t0:.1f}s) and the crops to {folder}")
    return path


if __name__ == "__main__":
    main()
