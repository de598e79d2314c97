"""Stop a run cleanly when the scheduler says so: SIGTERM (preemption, ``scancel``, torchrun shutting
down) or SIGUSR1 (SLURM's ``--signal=USR1@<seconds>`` warning ahead of the time limit).

The signal handler only sets a flag: no I/O, no collective, nothing that could deadlock or run in
the middle of a step. At a step boundary the run loop asks :meth:`PreemptionHandler.should_stop`,
which all-reduces the flag (MAX) so that every rank takes the same decision at the same step even
when only one of them was signalled; the loop then writes a complete checkpoint and exits with
:data:`EXIT_PREEMPTED`.

Exit code :data:`EXIT_PREEMPTED` = 75 (``EX_TEMPFAIL`` in sysexits.h: "temporary failure, try
again"). It differs from 0 (finished), 1 (error), 2 (bad flags), 3 (training diverged) and from
128 + N, which shells and launchers report for a process KILLED by signal N (143 = SIGTERM, 137 =
SIGKILL): 75 means "stopped on request, a complete checkpoint is on disk, resume with --resume".

torchrun forwards SIGTERM (and the signals listed in ``TORCHELASTIC_SIGNALS_TO_HANDLE``, e.g.
``SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``) to its workers and sends SIGKILL
``--shutdown-timeout`` seconds later (default 30): the checkpoint must fit in that window.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Install with :meth:`install` (main thread) or as a context manager; ``uninstall`` restores the
    previous handlers."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self._flag = False
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame):     # async-signal context: set a flag, nothing else
        self._flag = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python delivers "
                               "signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This process received a stop signal (local; use :meth:`should_stop` to decide)."""
        return self._flag

    def local_flag(self) -> float:
        """1.0 when signalled here, else 0.0: for a loop that already all-reduces (SUM) a vector of
        per-step values once per step, fold this in and stop when the sum is > 0, at no extra sync."""
        return 1.0 if self._flag else 0.0

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective: every rank calls it at the same step boundary and gets the same answer (True
        when any rank was signalled). One all-reduce of one element; under NCCL pass the current
        CUDA device."""
        flag = torch.tensor([self.local_flag()], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
