"""Evaluate RecTok models: ``python -m rectok_fast.evaluate`` (installed as ``rectok-eval``).

    rectok-eval recon --tokenizer tok.pth --data_path val/ --inception_weights inception.pth
    rectok-eval gen   --tokenizer tok.pth --dit dit.pth --guide guide.pth --scales 1.29 1.0 \\
                      --num_images 50000 --reference adm_in256_stats.npz --inception_weights inception.pth
    rectok-eval fid   generated/ reference_or_stats.npz --inception_weights inception.pth
    rectok-eval stats real_images/ real_stats.npz --inception_weights inception.pth
    rectok-eval probe --tokenizer tok.pth --data_path labelled_folder/

Every subcommand prints its results as ONE JSON object on the last line of stdout (lower-case
keys: psnr, ssim, lpips, rfid, fid, is_mean, is_std, precision, recall, top1); logs go to stderr.
``recon``, ``gen`` and ``probe`` run under ``torchrun`` / ``deepspeed`` on several ranks with the
same results. The Inception network is torch-fidelity's ``inception-v3-compat`` from a local file
(never downloaded); the metrics equal ``torch_fidelity.calculate_metrics`` on the same inputs.
"""
from __future__ import annotations

import argparse
import sys

from rectok_fast.evaluation.fidelity import WEIGHTS_HELP
from rectok_fast.evaluation.recon import evaluate_reconstruction  # noqa: F401  (the trainer's entry point)

__all__ = ["build_parser", "evaluate_reconstruction", "main", "run"]


def _device(p):
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")


def _inception(p, required_help=""):
    p.add_argument("--inception_weights", help="torch-fidelity Inception-v3 weights (.pth, local file). "
                   + required_help + WEIGHTS_HELP)


def _tokenizer(p, required=True):
    p.add_argument("--tokenizer", required=required,
                   help="tokenizer checkpoint (.pth, official or ours)"
                   + ("" if required else "; default: the one the DiT checkpoint records"))
    p.add_argument("--tokenizer_model", default=None,
                   help="tokenizer variant; default: what the checkpoint says, else rectok_BB_decft (official files)")
    p.add_argument("--tokenizer_weights", default="auto", choices=("auto", "model_ema", "model"),
                   help="which weights of the checkpoint; auto = model_ema if present")


def _images(p):
    p.add_argument("--data_path", help="image folder (ImageFolder tree or flat folder); root of --file_list")
    p.add_argument("--file_list", help="official train.txt-style list ('path label' per line)")
    p.add_argument("--num_images", type=int, default=None, help="use only the first N images")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers per rank")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectok-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    r = sub.add_parser("recon", help="tokenizer reconstruction: PSNR, SSIM, LPIPS, rFID, IS", formatter_class=fmt)
    _tokenizer(r)
    _images(r)
    _inception(r, "Without it rFID/IS are skipped. ")
    r.add_argument("--lpips_vgg_weights", help="torchvision vgg16 state dict (local) for LPIPS")
    r.add_argument("--lpips_lin_weights", help="LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)")
    r.add_argument("--eval_bsz", type=int, default=256,
                   help="GLOBAL evaluation batch (batches are dealt to ranks; results do not depend on the rank count)")
    r.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 autocast on CUDA (official), fp32 on CPU")
    r.add_argument("--grid_images", type=int, default=16, help="original/reconstruction pairs in the grid")
    r.add_argument("--out_dir", default="eval_recon")
    _device(r)

    g = sub.add_parser("gen", help="generator: gFID, IS, precision/recall per guidance scale", formatter_class=fmt)
    _tokenizer(g, required=False)
    g.add_argument("--dit", required=True, help="DiT^DH checkpoint (.pth; its EMA weights are used)")
    g.add_argument("--dit_model", default=None,
                   help="DiT variant; default: what the checkpoint says, else ditdh_xl (official files)")
    g.add_argument("--guide", help="AutoGuidance checkpoint (the weak model, e.g. DiT^DH-S at epoch 30)")
    g.add_argument("--guide_model", default=None,
                   help="AutoGuidance variant; default: what the checkpoint says, else ditdh_s")
    g.add_argument("--latent_stats", help="latent stats .pt (default: the DiT checkpoint's, else <tokenizer>.latent_stats.pt)")
    g.add_argument("--guidance", default=None, choices=("none", "cfg", "autoguidance"),
                   help="default: autoguidance with --guide, else cfg")
    g.add_argument("--scales", type=float, nargs="+", default=[1.29, 1.0], help="guidance scales (official 1.29 1.0)")
    g.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guidance interval in DiT time (t = 1 is data)")
    g.add_argument("--steps", type=int, default=150, help="Euler time-grid POINTS (official num_sampling_steps)")
    g.add_argument("--num_images", type=int, default=50000, help="images per scale (class i %% num_classes)")
    g.add_argument("--num_classes", type=int, default=None, help="default: the DiT's")
    g.add_argument("--eval_bsz", type=int, default=256, help="GLOBAL generation batch, dealt to the ranks")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--reference", help="reference: statistics .npz (mu, sigma) or a folder of real images")
    g.add_argument("--no_prc", dest="prc", action="store_false",
                   help="skip precision/recall (needs reference features: a folder or a .npz written with --with_features)")
    g.add_argument("--no_metrics", dest="metrics", action="store_false",
                   help="only generate the images (measure them later, e.g. with 'fid FOLDER REFERENCE')")
    _inception(g, "Required unless --no_metrics. ")
    g.add_argument("--grid_images", type=int, default=32)
    g.add_argument("--out_dir", default="eval_gen")
    g.add_argument("--no_progress", action="store_true")
    _device(g)

    f = sub.add_parser("fid", help="FID between two folders / .npz statistics (+ IS of a folder)", formatter_class=fmt)
    f.add_argument("a", help="folder of images or statistics .npz (for precision/recall: the generated side)")
    f.add_argument("b", help="folder of images or statistics .npz (the reference side)")
    _inception(f, "Required unless both are .npz. ")
    f.add_argument("--inception_bsz", type=int, default=64, help="Inception batch (torch-fidelity's default)")
    _device(f)

    s = sub.add_parser("stats", help="write the reference statistics (.npz with mu, sigma) of a folder",
                       formatter_class=fmt)
    s.add_argument("folder")
    s.add_argument("out", help="output .npz")
    s.add_argument("--with_features", action="store_true",
                   help="also store the 2048-d features (needed for precision/recall against this file)")
    _inception(s, "Required. ")
    s.add_argument("--inception_bsz", type=int, default=64)
    _device(s)

    q = sub.add_parser("probe", help="linear probe of the pooled latents on a labelled folder: top-1",
                       formatter_class=fmt)
    _tokenizer(q)
    _images(q)
    q.add_argument("--holdout", type=float, default=0.2, help="held-out fraction per class")
    q.add_argument("--seed", type=int, default=0, help="split seed")
    q.add_argument("--eval_bsz", type=int, default=64)
    q.add_argument("--out_dir", default="eval_probe")
    _device(q)
    return p


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "recon":
        from rectok_fast.evaluation.recon import run as go
    elif args.command == "gen":
        from rectok_fast.evaluation.gen import run as go
    elif args.command == "fid":
        from rectok_fast.evaluation.compare import run_fid as go
    elif args.command == "stats":
        from rectok_fast.evaluation.compare import run_stats as go
    else:
        from rectok_fast.evaluation.probe import run as go
    return go(args)


def main(argv=None) -> int:
    from rectok_fast.checkpoint import CheckpointError
    from rectok_fast.evaluation import data_io
    from rectok_fast.evaluation.fidelity import EvalError
    try:
        result = run(argv)
    except (EvalError, CheckpointError) as exc:
        print(f"rectok-eval: error: {exc}", file=sys.stderr)
        return 2
    if result:     # other ranks of a distributed run return {} and print nothing
        data_io.print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
