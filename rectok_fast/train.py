"""Train RecTok: ``deepspeed rectok_fast/train.py --deepspeed_config ds.json [args]``.

Also runs as ``torchrun ... rectok_fast/train.py``, ``python rectok_fast/train.py`` and
``python -m rectok_fast.train``. Stages: ``--stage tokenizer`` (stage 1), ``decoder_ft`` (stage 2),
``dit`` (DiT^DH generator; ``--preset autoguide`` trains the small AutoGuidance model). With no data
argument it trains a small preset on the bundled demo photos (see ``--help``).

Exit codes: 0 finished, 2 bad flags, 3 training diverged, 75 stopped by SIGTERM / SIGUSR1 after writing
a complete checkpoint (continue with ``--resume``; torchrun reports 1 instead, so the run also leaves
``<output_dir>/PREEMPTED``).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script path: drop this file's folder (rectok_fast/) from sys.path so that 'rectok_fast'
    # (and names like 'data' / 'losses') import as the installed package, never as loose modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    root = os.path.dirname(here)
    try:
        import rectok_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, root)

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing may download at run time


def main(argv=None, hooks=None) -> int:
    """Parse, resolve and validate the command line once, then train. ``hooks``: a
    :class:`rectok_fast.training.hooks.TrainHooks` (tests inject failures through it)."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.trainer import TrainingDiverged, run
    from rectok_fast.training.preemption import EXIT_PREEMPTED
    cfg = parse_config(argv)
    try:
        result = run(cfg, hooks=hooks)
    except TrainingDiverged as exc:
        print(f"[rectok_fast] ERROR: {exc}", file=sys.stderr, flush=True)
        return 3
    # stopped by SIGTERM / SIGUSR1 after writing a complete checkpoint: 75 (EX_TEMPFAIL), "resume me"
    return EXIT_PREEMPTED if result.get("preempted") else 0


def cli(argv=None, hooks=None) -> int:
    """The command line (``python rectok_fast/train.py``, ``rectok-train``): :func:`main`, then leave the
    process group. A gloo worker thread still alive when the interpreter exits can abort a finished rank
    ("terminate called without an active exception"), which the launcher reports as a failed run. In-process
    callers of :func:`main` (tests) keep their group."""
    rc = main(argv, hooks)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(cli())
