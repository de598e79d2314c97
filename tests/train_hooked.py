"""Test-only entry point: ``rectok_fast/train.py`` with failure hooks, for launcher tests.

    deepspeed tests/train_hooked.py [train.py flags]       # env: RECTOK_FAST_TEST_KILL_AT_STEP=N

The production loop has no test switches; this script installs :class:`KillAt` (SIGKILL this process
right after step N and its checkpoint) or :class:`SigtermAt` (``RECTOK_FAST_TEST_SIGTERM_AT_STEP=N``,
``RECTOK_FAST_TEST_SIGTERM_RANK=r``: SIGTERM to rank r in the middle of step N) or :class:`SignalPidAt`
(``RECTOK_FAST_TEST_SIGNAL_PIDFILE=<file>``, ``RECTOK_FAST_TEST_SIGNAL_AT_STEP=N``,
``RECTOK_FAST_TEST_SIGNAL=SIGUSR1``: rank 0 signals the launcher whose pid is in the file) and calls
``rectok_fast.train.cli`` with it. ``RECTOK_FAST_TEST_LOG_SAMPLES=<prefix>``: every rank appends the
dataset indices of each micro batch it trains on, with its global micro index ``m``, to
``<prefix>.rank<r>`` (JSON lines).
"""
from __future__ import annotations

import os
import signal
import sys

from rectok_fast.training.hooks import TrainHooks


class KillAt(TrainHooks):
    """SIGKILL after ``step`` finished steps (after that step's checkpoint, if one was due)."""

    def __init__(self, step: int):
        self.step = int(step)

    def after_step(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NonFiniteAt(TrainHooks):
    """Multiply the ``kind`` losses ('generator' / 'discriminator') of the given steps by NaN (or inf)."""

    def __init__(self, steps, kind: str = "generator", value: float = float("nan")):
        self.steps, self.kind, self.value = set(int(s) for s in steps), kind, value

    def loss(self, step, kind, loss):
        return loss * self.value if step in self.steps and kind == self.kind else loss


class SigtermAt(TrainHooks):
    """SIGTERM this process while step ``step`` (0-based) runs: after its first micro batch's loss."""

    def __init__(self, step: int):
        self.step, self.sent = int(step), False

    def loss(self, step, kind, loss):
        if step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return loss


class SignalPidAt(TrainHooks):
    """Send ``sig`` to the process whose pid is in ``pidfile`` (a launcher, e.g. the SLURM batch shell)
    while step ``step`` (0-based) runs, then hold the step until the signal has come back to this
    process through the launcher chain (the trainer's preemption handler saw it): the run then stops
    at a known step. Fails if it never arrives."""

    def __init__(self, step: int, pidfile: str, sig: str = "SIGUSR1", timeout: float = 60.0):
        self.step, self.pidfile, self.sig, self.timeout, self.sent = int(step), pidfile, sig, timeout, False

    def loss(self, step, kind, loss):
        if step == self.step and not self.sent:
            import time
            self.sent = True
            sig = signal.Signals[self.sig]
            deadline = time.time() + self.timeout
            while not os.path.exists(self.pidfile) or not open(self.pidfile).read().strip():
                if time.time() > deadline:
                    raise RuntimeError(f"no pid in {self.pidfile}")
                time.sleep(0.05)
            os.kill(int(open(self.pidfile).read()), sig)
            handler = signal.getsignal(sig)       # the bound PreemptionHandler._on_signal of the loop
            while not getattr(getattr(handler, "__self__", None), "requested", False):
                if time.time() > deadline:
                    raise RuntimeError(f"{self.sig} sent to pid {open(self.pidfile).read().strip()} never "
                                       f"reached this worker within {self.timeout:.0f} s")
                time.sleep(0.05)
        return loss


def log_samples(prefix: str) -> None:
    """Record the dataset indices of every micro batch the loop hands to the stage."""
    import json
    from rectok_fast.training import trainer
    inner = trainer.micro_batches
    path = f"{prefix}.rank{os.environ.get('RANK', '0')}"

    def logged(*args, **kwargs):
        for step, chunks in inner(*args, **kwargs):
            with open(path, "a") as fh:
                for c in chunks:
                    fh.write(json.dumps({"step": step, "rank": c["rank"], "micro": c["micro"], "m": c["m"],
                                         "indices": c["indices"].tolist()}) + "\n")
            yield step, chunks
    trainer.micro_batches = logged


if __name__ == "__main__":
    from rectok_fast.train import cli
    if os.environ.get("RECTOK_FAST_TEST_LOG_SAMPLES"):
        log_samples(os.environ["RECTOK_FAST_TEST_LOG_SAMPLES"])
    kill = os.environ.get("RECTOK_FAST_TEST_KILL_AT_STEP")
    term = os.environ.get("RECTOK_FAST_TEST_SIGTERM_AT_STEP")
    hooks = None
    if kill:
        hooks = KillAt(int(kill))
    elif term and os.environ.get("RANK", "0") == os.environ.get("RECTOK_FAST_TEST_SIGTERM_RANK", "0"):
        hooks = SigtermAt(int(term))
    elif os.environ.get("RECTOK_FAST_TEST_SIGNAL_PIDFILE") and os.environ.get("RANK", "0") == "0":
        hooks = SignalPidAt(int(os.environ["RECTOK_FAST_TEST_SIGNAL_AT_STEP"]),
                            os.environ["RECTOK_FAST_TEST_SIGNAL_PIDFILE"],
                            os.environ.get("RECTOK_FAST_TEST_SIGNAL", "SIGUSR1"))
    sys.exit(cli(hooks=hooks))
