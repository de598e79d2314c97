"""The SLURM batch script (rectok_fast/launch/slurm_train.sbatch), run with bash on a machine without
SLURM: ``scontrol``, ``srun`` and a recording ``torchrun`` wrapper are small shims this test writes
into tmp_path and puts first on PATH; the SLURM_* variables are the ones sbatch would set.

What is faked and what is real:

* ``scontrol show hostnames`` expands the node list; ``scontrol requeue`` only records the call.
* ``srun`` starts the command once per "node" on this machine, with that node's SLURM_NODEID /
  SLURM_PROCID, and relays SIGTERM / SIGUSR1 / SIGINT to them (as srun does); it ignores
  ``--kill-on-bad-exit``.
* ``torchrun`` records each node's command line, then either runs the real torchrun (the end-to-end
  test: two "nodes" on 127.0.0.1 and 127.0.0.2, c10d rendezvous, real training, gloo) or, in the fast
  tests of the script's own logic, stands in for a run (finishes, fails, or waits for a signal and
  leaves a checkpoint and PREEMPTED as the trainer does).
* the script itself is the real file, copied to a spool directory and run from there with bash, as
  slurmd runs a batch script; the signals go to that bash process, as SLURM's ``--signal=B:USR1@T``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "rectok_fast", "launch", "slurm_train.sbatch")
REAL_TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

SCONTROL = r'''#!{python}
"""fake scontrol: 'show hostnames [LIST]' and 'requeue JOBID' (recorded)"""
import os, re, sys

def expand(nodelist):
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        for r in m.group(2).split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{{m.group(1)}}{{i:0{{len(lo)}}d}}{{m.group(3)}}")
    return hosts

args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(" ".join(["scontrol"] + args) + "\n")
if args[:2] == ["show", "hostnames"]:
    print("\n".join(expand(args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"])))
elif args[:1] == ["requeue"] and len(args) == 2:
    pass
else:
    sys.exit(f"fake scontrol: unsupported {{args}}")
'''

SRUN = r'''#!{python}
"""fake srun: run the command once per node of the allocation, relay stop signals, exit with the
highest task exit code (128 + N for a task killed by signal N), as srun does"""
import json, os, signal, subprocess, sys

args, opts = sys.argv[1:], []
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
while args and args[0].startswith("-"):
    a = args.pop(0)
    opts.append(a)
    if a.startswith("--nodes="):
        nodes = int(a.split("=", 1)[1])
    elif a.startswith("--ntasks-per-node=") and a != "--ntasks-per-node=1":
        sys.exit("fake srun: only one task per node")
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"options": opts, "command": args, "pid": os.getpid()}}) + "\n")
hosts = subprocess.run(["scontrol", "show", "hostnames"], capture_output=True, text=True,
                       check=True).stdout.split()
procs = []

def relay(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)

for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, relay)
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_STEP_ID="0", SLURMD_NODENAME=hosts[node])
    procs.append(subprocess.Popen(args, env=env))
rcs = [p.wait() for p in procs]
sys.exit(max(rc if rc >= 0 else 128 - rc for rc in rcs))
'''

TORCHRUN = r'''#!{python}
"""torchrun wrapper: record this node's command line, then run the real torchrun (FAKE_TORCHRUN
unset) or stand in for a run: 'finish' (exit 0), 'fail' (exit 1), 'preempt' (wait for SIGUSR1 /
SIGTERM, then leave a checkpoint and PREEMPTED as the trainer does, and exit 1 as torchrun does)"""
import json, os, signal, sys, time

argv = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"node": os.environ.get("SLURM_NODEID"), "argv": argv}}) + "\n")
mode = os.environ.get("FAKE_TORCHRUN")
if not mode:
    os.execv({real!r}, [{real!r}] + argv)
if mode == "finish":
    sys.exit(0)
if mode == "fail":
    sys.exit(1)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
with open(os.path.join({tmp!r}, "ready." + os.environ["SLURM_NODEID"]), "w") as fh:
    fh.write(str(os.getpid()))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.3)                    # a second signal, if one is relayed, arrives meanwhile
out = argv[argv.index("--output_dir") + 1]
with open(os.path.join({tmp!r}, "signals." + os.environ["SLURM_NODEID"]), "w") as fh:
    fh.write(" ".join(signal.Signals(s).name for s in got))
if got and os.environ["SLURM_NODEID"] == "0":
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    with open(os.path.join(out, "checkpoints", "latest"), "w") as fh:
        fh.write("step_00000002\n")
    with open(os.path.join(out, "PREEMPTED"), "w") as fh:
        fh.write("step_00000002\n")
sys.exit(1)
'''


class FakeSlurm:
    """A tmp_path with the shims on PATH and the environment of a job of ``nodes`` nodes."""

    def __init__(self, tmp_path, nodes=2):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.scontrol_log, self.srun_log, self.torchrun_log = (tmp_path / f for f in
                                                               ("scontrol.log", "srun.jsonl", "torchrun.jsonl"))
        fmt = dict(python=sys.executable, real=REAL_TORCHRUN, tmp=str(tmp_path))
        for name, text, log in (("scontrol", SCONTROL, self.scontrol_log), ("srun", SRUN, self.srun_log),
                                ("torchrun", TORCHRUN, self.torchrun_log)):
            path = self.bin / name
            path.write_text(text.format(log=str(log), **fmt))
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        # slurmd runs a copy of the batch script from its spool directory, in the submit directory
        spool = tmp_path / "spool" / "job"
        spool.mkdir(parents=True)
        self.script = str(spool / "slurm_script")
        shutil.copyfile(SCRIPT, self.script)
        self.job_id = random.randint(100000, 999999)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", RECTOK_FAST_QUIET="1", TRITON_INTERPRET="1",
                        HF_HUB_OFFLINE="1",
                        PATH=os.pathsep.join([str(self.bin), os.path.dirname(sys.executable),
                                              os.environ.get("PATH", "")]))
        self.env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
        for k in [k for k in self.env if k.startswith("SLURM_")]:
            del self.env[k]
        self.set_nodes(nodes)
        self.env.update(SLURM_JOB_ID=str(self.job_id), SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE="1")

    def set_nodes(self, nodes):
        # 127.0.0.1 and 127.0.0.2 are both loopback: two "nodes" on this machine, the first one hosts
        # the rendezvous
        self.env.update(SLURM_JOB_NODELIST="127.0.0.[1-2]" if nodes == 2 else "127.0.0.1",
                        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes))

    def start(self, args, restart=None, **env):
        e = dict(self.env, **{k: str(v) for k, v in env.items()})
        if restart is not None:
            e["SLURM_RESTART_COUNT"] = str(restart)
        return subprocess.Popen(["bash", self.script] + list(args), cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(self, args, timeout=60, **kw):
        p = self.start(args, **kw)
        try:
            out = p.communicate(timeout=timeout)[0]
        finally:
            if p.poll() is None:
                p.kill()
        return p.returncode, out

    def calls(self, log):
        if not log.exists():
            return []
        if log.suffix == ".jsonl":
            return [json.loads(line) for line in log.read_text().splitlines()]
        return log.read_text().splitlines()

    def requeues(self):
        return [c for c in self.calls(self.scontrol_log) if c.startswith("scontrol requeue")]

    @property
    def port(self):
        return 29400 + self.job_id % 1000


def _opt(argv, name):
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- the script's logic (fast, no training)

def test_launch_line_requeue_and_resume_logic(tmp_path):
    """torchrun per node with the derived rendezvous; a finished run exits 0 without a requeue; a
    failed run passes srun's code through without a requeue; a checkpoint makes the next run --resume."""
    slurm = FakeSlurm(tmp_path)
    out = str(tmp_path / "run")
    args = ["--stage", "tokenizer", "--output_dir", out]
    rc, log = slurm.run(args, FAKE_TORCHRUN="finish")
    assert rc == 0, log
    (srun,) = slurm.calls(slurm.srun_log)
    assert srun["options"] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    nodes = {c["node"]: c["argv"] for c in slurm.calls(slurm.torchrun_log)}
    assert sorted(nodes) == ["0", "1"]
    for node, argv in nodes.items():
        assert _opt(argv, "--node_rank") == node
        assert _opt(argv, "--nnodes") == "2" and _opt(argv, "--nproc_per_node") == "1"
        assert _opt(argv, "--rdzv_backend") == "c10d" and _opt(argv, "--rdzv_id") == str(slurm.job_id)
        assert _opt(argv, "--rdzv_endpoint") == f"127.0.0.1:{slurm.port}"
        assert "SIGUSR1" in _opt(argv, "--signals-to-handle").split(",")
        assert int(_opt(argv, "--shutdown-timeout")) < 120          # below the --signal=B:USR1@120 warning
        assert argv[-len(args) - 1:] == ["rectok_fast/train.py"] + args and "--resume" not in argv
    assert slurm.requeues() == []

    rc, log = slurm.run(args, FAKE_TORCHRUN="fail")
    assert rc == 1 and slurm.requeues() == [], log

    # a complete checkpoint and a stale marker from an earlier job: resume, and the marker is not
    # mistaken for a preemption of this run
    os.makedirs(os.path.join(out, "checkpoints"))
    open(os.path.join(out, "checkpoints", "latest"), "w").write("step_00000002\n")
    open(os.path.join(out, "PREEMPTED"), "w").write("step_00000002\n")
    slurm.set_nodes(1)                       # the requeued job got one node
    slurm.torchrun_log.unlink()
    rc, log = slurm.run(["--output_dir=" + out, "--stage", "tokenizer"], restart=1, FAKE_TORCHRUN="finish")
    assert rc == 0 and slurm.requeues() == [], log
    (call,) = slurm.calls(slurm.torchrun_log)
    assert call["argv"][-1] == "--resume" and _opt(call["argv"], "--nnodes") == "1"
    assert "resuming from" in log and "restart 1" in log
    assert not os.path.exists(os.path.join(out, "PREEMPTED"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_batch_shell_is_forwarded_once_and_requeues(tmp_path, sig):
    """The signal reaches the shell while srun runs in the background; the shell passes it on once
    (a second one is not repeated), every node's torchrun gets it, and the PREEMPTED marker makes the
    script call scontrol requeue and exit 75."""
    slurm = FakeSlurm(tmp_path)
    p = slurm.start(["--output_dir", str(tmp_path / "run")], FAKE_TORCHRUN="preempt")
    try:
        deadline = time.time() + 30
        while not all((tmp_path / f"ready.{n}").exists() for n in (0, 1)):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0]
            time.sleep(0.05)
        p.send_signal(sig)
        time.sleep(0.1)
        p.send_signal(sig)
        out = p.communicate(timeout=30)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, out
    for n in (0, 1):
        assert (tmp_path / f"signals.{n}").read_text() == sig.name, out
    assert slurm.requeues() == [f"scontrol requeue {slurm.job_id}"]
    assert f"SIG{sig.name[3:]}: asking every node" in out
    # the shell waited for srun (the marker is written after the signal) instead of leaving early
    assert "stopped after a complete checkpoint (step_00000002)" in out, out


def test_bad_invocations_fail_clearly(tmp_path):
    slurm = FakeSlurm(tmp_path)
    rc, out = slurm.run(["--stage", "tokenizer"])
    assert rc == 2 and "--output_dir is required" in out
    rc, out = slurm.run(["--output_dir", "x"], RECTOK_TRAIN_PY="no/such.py")
    assert rc == 2 and "run sbatch from the repository root" in out
    env = dict(slurm.env)
    del env["SLURM_GPUS_ON_NODE"]
    p = subprocess.run(["bash", slurm.script, "--output_dir", "x"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "RECTOK_NPROC_PER_NODE" in p.stderr
    assert slurm.calls(slurm.srun_log) == []


# ---------------------------------------------------------------- end to end: real torchrun, real training

@pytest.mark.slow
def test_two_nodes_preempted_requeued_and_resumed(tmp_path):
    """Job 1: two "nodes" x one process, tokenizer stage, tiny preset, ZeRO-2, gloo; SIGUSR1 to the batch
    shell during step index 1 (as --signal=B:USR1@T does): both nodes stop after step 2 with a complete
    checkpoint, the script requeues the job and exits 75. Job 1 again (SLURM_RESTART_COUNT=1), on the one
    node SLURM gave it this time: it adds --resume, resumes on one process with the same global batch and
    finishes the 4 steps."""
    slurm = FakeSlurm(tmp_path)
    ds = tmp_path / "ds_zero2.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 3.0, "bf16": {"enabled": False},
                              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}))
    out = str(tmp_path / "run")
    args = ["--stage", "tokenizer", "--preset", "tiny", "--batch_size", "2", "--max_steps", "4", "--seed", "5",
            "--no_progress", "--deepspeed_config", str(ds), "--output_dir", out]
    pidfile = tmp_path / "batch_shell.pid"
    p = slurm.start(args, RECTOK_TRAIN_PY="tests/train_hooked.py", RECTOK_SHUTDOWN_TIMEOUT=60,
                    RECTOK_FAST_TEST_SIGNAL_PIDFILE=pidfile, RECTOK_FAST_TEST_SIGNAL_AT_STEP=1)
    pidfile.write_text(str(p.pid))
    try:
        log = p.communicate(timeout=240)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, log[-6000:]
    assert "SIGUSR1: asking every node" in log
    assert open(os.path.join(out, "PREEMPTED")).read().strip() == "step_00000002", log[-6000:]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_00000002"
    assert slurm.requeues() == [f"scontrol requeue {slurm.job_id}"]
    first = {c["node"]: c["argv"] for c in slurm.calls(slurm.torchrun_log)}
    assert {n: _opt(a, "--node_rank") for n, a in first.items()} == {"0": "0", "1": "1"}
    assert all(_opt(a, "--rdzv_endpoint") == f"127.0.0.1:{slurm.port}" and "--resume" not in a
               for a in first.values())

    slurm.torchrun_log.unlink()
    slurm.set_nodes(1)          # one node this time (and one process: fewer on this 2-core machine)
    rc, log = slurm.run(args, restart=1, timeout=240)
    assert rc == 0, log[-6000:]
    (call,) = slurm.calls(slurm.torchrun_log)
    assert call["argv"][-1] == "--resume" and _opt(call["argv"], "--nnodes") == "1"
    assert "resumed from" in log and "at step 2" in log, log[-6000:]
    assert "global batch 4 kept on 1 processes x --batch_size 2 x --grad_accum 2 (saved on 2 processes)" in log
    assert slurm.requeues() == [f"scontrol requeue {slurm.job_id}"]          # no second requeue
    assert not os.path.exists(os.path.join(out, "PREEMPTED"))
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_00000004"
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        steps = [json.loads(line)["step"] for line in fh if '"loss"' in line]
    assert steps == [1, 2, 3, 4], steps
