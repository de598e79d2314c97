"""Preemption: the signal handler only sets a flag; should_stop() is the same on every rank (one of
two gloo processes is signalled) and the run exits with the documented code."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from rectok_fast.training.preemption import EXIT_PREEMPTED, PreemptionHandler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")
WORKER = os.path.join(ROOT, "tests", "scripts", "preempt_worker.py")


def test_exit_code_is_distinct():
    # not success/error/usage/diverged (3), and not 128+N: what a launcher reports for a KILLED process
    assert EXIT_PREEMPTED not in (0, 1, 2, 3) and EXIT_PREEMPTED < 128


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_handler_sets_flag_and_restores(sig):
    before = signal.getsignal(sig)
    h = PreemptionHandler()
    with h:
        assert not h.requested and not h.should_stop()
        os.kill(os.getpid(), sig)
        for _ in range(100):          # Python runs the handler at the next bytecode boundary
            if h.requested:
                break
            time.sleep(0.01)
        assert h.requested and h.signal_name == sig.name
        assert h.should_stop() and h.local_flag() == 1.0
    assert signal.getsignal(sig) == before


def test_install_outside_main_thread_is_refused():
    import threading
    box = {}

    def run():
        try:
            PreemptionHandler().install()
        except RuntimeError as exc:
            box["err"] = str(exc)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert "main thread" in box.get("err", "")


@pytest.mark.slow
def test_two_ranks_agree_when_one_is_signalled(tmp_path):
    port = random.randint(20000, 40000)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([DS, "--num_gpus", "2", "--master_port", str(port), WORKER, str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"pid_{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.2)
        time.sleep(0.5)                        # a few steps in
        os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGTERM)     # rank 1 only
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    seen = [json.loads((tmp_path / f"stopped_{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["step"] == seen[1]["step"] > 1
    assert seen[0]["signalled_here"] is False and seen[1]["signalled_here"] is True
    assert seen[1]["signal"] == "SIGTERM"


@pytest.mark.slow
def test_torchrun_forwards_sigusr1_to_every_worker(tmp_path):
    """SLURM's --signal=USR1@T reaches the launcher: torchrun relays it to its workers when
    --signals-to-handle lists SIGUSR1 (without it torchrun dies of the signal, rc 138, and the workers
    never see it); both ranks stop at the same step. torchrun itself exits 1 (not 75) when its
    workers exit 75: batch scripts must not rely on torchrun's exit code."""
    port = random.randint(20000, 40000)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.Popen([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                             "--master_port", str(port), "--shutdown-timeout", "60",
                             "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", WORKER, str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"pid_{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.2)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGUSR1)      # the launcher, not the workers
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen = [json.loads((tmp_path / f"stopped_{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["step"] == seen[1]["step"] > 1, out[-3000:]
    assert all(s["signal"] == "SIGUSR1" for s in seen)
    assert proc.returncode == 1
