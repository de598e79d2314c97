"""Class-conditional sampling: DiT^DH (+ optional AutoGuidance / CFG) -> tokenizer decoder -> PNGs.

    python -m rectok_fast.sample --tokenizer RecTok_decft.pth --dit ditdhxl_epoch_0599.pth \\
        --guide ditdhs_epoch_0029.pth --guidance autoguidance --scale 1.29 --labels 207,360 --num_images 8

With no checkpoints at all it runs tiny RANDOM models (a smoke test of the whole path, < 1 min on a
CPU) and says loudly that the images are noise. Official .pth dicts and ours (same layout, see
:mod:`rectok_fast.checkpoint`) both load: ours describe their model variant, latent statistics and
tokenizer (``rectok-sample --dit final.pth`` alone finds the rest); official files load by the
registered variant names given with ``--*-model`` (a file that does not fit names the variants it fits). Sampling follows the official evaluation: EMA weights,
Euler ODE on the shifted grid, bf16 autocast on CUDA, uint8 = trunc(255 x).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from rectok_fast import flow

NO_CHECKPOINT_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  NO CHECKPOINTS GIVEN: sampling with tiny RANDOMLY INITIALIZED models.                        !!
!!  The images written are NOISE, not samples. This only checks that the pipeline runs.        !!
!!  Pass --tokenizer and --dit (and --guide for AutoGuidance) to sample real images.            !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

#: the registered variants of the no-checkpoint mode (4x4x16 latents)
RANDOM_TOKENIZER, RANDOM_DIT = "rectok_tiny_decft", "ditdh_tiny"


class SampleError(RuntimeError):
    """A sampling request that cannot be carried out as given (bad files, shapes or options)."""


# ----------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectok-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--tokenizer", help="tokenizer checkpoint (.pth, official RecTok_decft.pth or ours); default: "
                   "the one our DiT checkpoint names")
    g.add_argument("--tokenizer_model", "--tokenizer-model", default=None, help="tokenizer variant (default: the file's own, else "
                   "rectok_BB_decft)")
    g.add_argument("--tokenizer_weights", "--tokenizer-weights", default="auto", choices=("auto", "model_ema", "model"),
                   help="which weights of the tokenizer checkpoint; auto = model_ema if present")
    g.add_argument("--latent_stats", "--latent-stats", help="per-channel latent stats (.pt with mean/std); "
                   "default <tokenizer>.latent_stats.pt, else the DiT checkpoint's 'latent_stats' entry")
    g.add_argument("--dit", help="DiT^DH checkpoint (.pth); its 'model_ema' weights are used")
    g.add_argument("--dit_model", "--dit-model", default=None, help="DiT variant (default: the file's own, else ditdh_xl)")
    g.add_argument("--guide", help="AutoGuidance checkpoint (weak model, e.g. ditdhs_epoch_0029.pth; 'model_ema')")
    g.add_argument("--guide_model", "--guide-model", default=None, help="variant of the AutoGuidance model (default: the file's "
                   "own, else ditdh_s)")
    s = p.add_argument_group("sampling")
    s.add_argument("--labels", default="all", help="'all' (cycle 0..num_classes-1) or comma-separated class ids")
    s.add_argument("--num_images", "--num-images", type=int, default=16)
    s.add_argument("--batch_size", "--batch-size", type=int, default=16)
    s.add_argument("--steps", type=int, default=150, help="time-grid POINTS (official num_sampling_steps)")
    s.add_argument("--guidance", choices=flow.GUIDANCE_KINDS, default=None,
                   help="default: autoguidance when --guide is given, else none")
    s.add_argument("--scale", type=float, default=1.0, help="guidance scale (official AutoGuidance: 1.29)")
    s.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guidance interval in DiT time (t = 1 is data)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    o = p.add_argument_group("output")
    o.add_argument("--out_dir", "--out-dir", default="samples")
    o.add_argument("--grid_cols", "--grid-cols", type=int, default=8)
    o.add_argument("--no_progress", "--no-progress", action="store_true")
    return p


def parse_labels(spec: str, num_classes: int) -> list[int]:
    """'all' -> 0..num_classes-1; '3,7' -> [3, 7]; every id must be a real class (not the null id)."""
    if spec.strip().lower() == "all":
        return list(range(num_classes))
    try:
        labels = [int(v) for v in spec.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise SampleError(f"--labels must be 'all' or comma-separated integers, got {spec!r}") from None
    if not labels:
        raise SampleError("--labels is empty")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise SampleError(f"class ids {bad} are outside [0, {num_classes - 1}]")
    return labels


def label_schedule(labels: list[int], num_images: int) -> torch.Tensor:
    """Image i gets labels[i % len(labels)] (the official gFID run cycles 0..999 the same way)."""
    if num_images < 1:
        raise SampleError(f"--num_images must be >= 1, got {num_images}")
    return torch.tensor([labels[i % len(labels)] for i in range(num_images)], dtype=torch.long)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name} was asked for but no CUDA device is visible")
    return dev


# ----------------------------------------------------------------------------------------------------
# models


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise SampleError(f"{what} checkpoint not found: {path}")
    return path


def _read(path: str, what: str) -> dict:
    from rectok_fast.checkpoint import safe_torch_load
    ckpt = safe_torch_load(require_file(path, what))
    if not isinstance(ckpt, dict):
        raise SampleError(f"{what} checkpoint {path} is not a dict")
    return ckpt


def _variant(ckpt: dict, given: str | None, official: str) -> str:
    """The variant to build: the user's, else the file's own description, else the official one."""
    from rectok_fast.checkpoint import checkpoint_config
    return given or (checkpoint_config(ckpt) or {}).get("variant") or official


def load_dit(path: str, variant: str | None, device: torch.device, what: str = "DiT", official: str = "ditdh_xl",
             flag: str = "--dit_model"):
    """Build the DiT a checkpoint holds and load its EMA weights ('model' if the file has no 'model_ema').
    Returns (model, checkpoint dict)."""
    from rectok_fast.checkpoint import CheckpointError, build_from_checkpoint
    ckpt = _read(path, what)
    over = dict(ckpt.get("dit_config") or {})      # files written before checkpoints described themselves
    if "model_ema" not in ckpt:
        print(f"[rectok-sample] warning: {path} has no 'model_ema'; sampling with the raw 'model' weights",
              file=sys.stderr)
    try:
        model, _ = build_from_checkpoint(ckpt, _variant(ckpt, variant, official), device=device, flag=flag, **over)
    except (CheckpointError, ValueError, TypeError) as exc:
        raise SampleError(f"{what} checkpoint {path} does not fit the model: {exc}") from exc
    return model.to(device).eval(), ckpt


def load_tokenizer(path: str, variant: str | None, weights: str, device: torch.device):
    """The decoding tokenizer (the decode-only twin of the variant: a stage-1 file's teacher and semantic
    decoders are skipped)."""
    from rectok_fast.checkpoint import CheckpointError, build_from_checkpoint
    from rectok_fast.models import registry
    ckpt = _read(path, "tokenizer")
    which = weights if weights != "auto" else ("model_ema" if "model_ema" in ckpt else "model")
    try:
        name = registry.decode_only_name(_variant(ckpt, variant, "rectok_BB_decft"))
        tok, _ = build_from_checkpoint(ckpt, name, which=which, device=device, flag="--tokenizer_model")
    except (CheckpointError, ValueError, TypeError) as exc:
        raise SampleError(f"tokenizer checkpoint {path} does not fit the model: {exc}") from exc
    return tok.to(device).eval()


def install_latent_stats(tok, stats_path: str | None, tokenizer_path: str, dit_ckpt: dict) -> str:
    """Set the tokenizer's per-channel latent stats; returns where they came from."""
    from rectok_fast.checkpoint import checkpoint_config
    from rectok_fast.latent_stats import latent_stats_path, load_latent_stats
    if stats_path is not None:
        mean, std = load_latent_stats(require_file(stats_path, "latent stats"))
        tok.set_latent_stats(mean, std)
        return stats_path
    stats = (checkpoint_config(dit_ckpt) or {}).get("latent_stats") or dit_ckpt.get("latent_stats")
    if isinstance(stats, dict) and "mean" in stats and "std" in stats:
        tok.set_latent_stats(stats["mean"], stats["std"])
        return "the DiT checkpoint"
    if os.path.isfile(latent_stats_path(tokenizer_path)):
        mean, std = load_latent_stats(latent_stats_path(tokenizer_path))
        tok.set_latent_stats(mean, std)
        return latent_stats_path(tokenizer_path)
    print("[rectok-sample] WARNING: no latent stats found (--latent-stats, the DiT checkpoint, or "
          "<tokenizer>.latent_stats.pt): decoding with mean 0 / std 1, which is WRONG for the official models.",
          file=sys.stderr)
    return "none (mean 0, std 1)"


def recorded_tokenizer(dit_ckpt: dict) -> str | None:
    """The tokenizer checkpoint our DiT checkpoints name (None for official files or a missing file)."""
    from rectok_fast.checkpoint import checkpoint_config
    path = ((checkpoint_config(dit_ckpt) or {}).get("tokenizer") or {}).get("checkpoint")
    return path if path and os.path.isfile(path) else None


def random_models(guided: bool, device: torch.device, seed: int):
    """Tiny random tokenizer + DiT (+ guide) for the no-checkpoint smoke mode."""
    from rectok_fast.models.registry import build_model
    torch.manual_seed(seed)
    tok = build_model(RANDOM_TOKENIZER)
    make = lambda: build_model(RANDOM_DIT, input_size=tok.seq_h, in_channels=tok.token_channels)  # noqa: E731
    dit = make()
    randomize_zero_init(dit)
    guide = None
    if guided:
        guide = make()
        randomize_zero_init(guide)
    return tok.to(device).eval(), dit.to(device).eval(), (guide.to(device).eval() if guide is not None else None)


def randomize_zero_init(model) -> None:
    """The official init zeroes the output layers (a fresh DiT predicts v = 0); give them small random
    values so the smoke mode exercises the whole network."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.abs().max() == 0 and "norm" not in name:
                p.normal_(0.0, 0.02)


def check_latent_match(tok, dit, guide=None) -> None:
    want = (tok.token_channels, tok.seq_h, tok.seq_w)
    for what, m in (("DiT", dit), ("AutoGuidance model", guide)):
        if m is not None and tuple(m.latent_shape) != want:
            raise SampleError(f"latent shape mismatch: the tokenizer makes latents {want} (C, h, w) but the "
                              f"{what} expects {tuple(m.latent_shape)}; check --dit_model/--guide_model and the files")


# ----------------------------------------------------------------------------------------------------
# output


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) by truncation, as the official evaluation saves PNGs."""
    return (images.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_pngs(images_u8: torch.Tensor, labels: torch.Tensor, out_dir: str, start: int) -> list[str]:
    from PIL import Image
    paths = []
    for i, (img, lab) in enumerate(zip(images_u8, labels.tolist())):
        path = os.path.join(out_dir, f"{start + i:06d}_class{lab:04d}.png")
        Image.fromarray(img.numpy()).save(path)
        paths.append(path)
    return paths


def save_grid(images_u8: torch.Tensor, path: str, cols: int, pad: int = 2) -> str:
    from PIL import Image
    n, h, w, _ = images_u8.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images_u8[i]
    Image.fromarray(canvas.numpy()).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# driver


def generate(tok, dit, labels: torch.Tensor, args, guide=None) -> tuple[list[str], str]:
    """Sample every label in batches, decode, write PNGs and the grid. Returns (image paths, grid path)."""
    from tqdm.auto import tqdm
    device = next(dit.parameters()).device
    gen = torch.Generator().manual_seed(args.seed)      # CPU: the same noise on every device
    os.makedirs(args.out_dir, exist_ok=True)
    paths, all_u8 = [], []
    bar = tqdm(total=len(labels), desc="images", unit="img", disable=args.no_progress)
    for start in range(0, len(labels), args.batch_size):
        y = labels[start: start + args.batch_size]
        z = flow.sample_latents(dit, y, num_steps=args.steps, guidance=args.guidance, scale=args.scale,
                                guide_model=guide, interval=tuple(args.interval), generator=gen,
                                progress=not args.no_progress)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = tok.detokenize(z)
        u8 = to_uint8(images)
        paths += save_pngs(u8, y, args.out_dir, start)
        all_u8.append(u8)
        bar.update(len(y))
    bar.close()
    grid = save_grid(torch.cat(all_u8), os.path.join(args.out_dir, "grid.png"), args.grid_cols)
    return paths, grid


def resolve_models(args, device):
    """(tokenizer, dit, guide, random_mode) from the arguments, with clear errors for bad combinations."""
    if args.guidance is None:
        args.guidance = "autoguidance" if args.guide else "none"
    if not args.tokenizer and not args.dit:
        if args.guide:
            raise SampleError("--guide needs --dit and --tokenizer as well")
        print(NO_CHECKPOINT_BANNER, file=sys.stderr, flush=True)
        if device.type == "cpu":
            # Tiny matmuls gain nothing from threads, and on a shared CPU thread contention makes
            # them ~30x slower; one thread keeps the smoke test well under a minute.
            torch.set_num_threads(1)
        tok, dit, guide = random_models(args.guidance == "autoguidance", device, args.seed)
        return tok, dit, guide, True
    if args.dit and not args.tokenizer and os.path.isfile(args.dit):
        args.tokenizer = recorded_tokenizer(_read(args.dit, "DiT"))
    if not (args.tokenizer and args.dit):
        missing = "--tokenizer" if not args.tokenizer else "--dit"
        raise SampleError(f"{missing} is missing: real sampling needs both a tokenizer and a DiT checkpoint "
                          "(give neither for the random smoke test)")
    if args.guidance == "autoguidance" and not args.guide:
        raise SampleError("--guidance autoguidance needs --guide (the weak model's checkpoint)")
    for path, what in ((args.tokenizer, "tokenizer"), (args.dit, "DiT"), (args.guide, "AutoGuidance")):
        if path:
            require_file(path, what)
    tok = load_tokenizer(args.tokenizer, args.tokenizer_model, args.tokenizer_weights, device)
    dit, dit_ckpt = load_dit(args.dit, args.dit_model, device)
    guide = (load_dit(args.guide, args.guide_model, device, "AutoGuidance", official="ditdh_s", flag="--guide_model")[0]
             if args.guide else None)
    check_latent_match(tok, dit, guide)
    source = install_latent_stats(tok, args.latent_stats, args.tokenizer, dit_ckpt)
    print(f"[rectok-sample] latent stats: {source}", file=sys.stderr)
    return tok, dit, guide, False


def run(argv=None) -> tuple[list[str], str]:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.batch_size < 1:
        raise SampleError(f"--batch_size must be >= 1, got {args.batch_size}")
    tok, dit, guide, random_mode = resolve_models(args, device)   # checks the latent shapes
    labels = label_schedule(parse_labels(args.labels, dit.num_classes), args.num_images)
    paths, grid = generate(tok, dit, labels, args, guide)
    note = "  (RANDOM MODELS: these images are noise)" if random_mode else ""
    print(f"[rectok-sample] wrote {len(paths)} images and {grid}{note}", file=sys.stderr)
    return paths, grid


def main(argv=None) -> int:
    from rectok_fast.checkpoint import CheckpointError
    try:
        run(argv)
    except (SampleError, CheckpointError) as exc:
        print(f"rectok-sample: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
