"""Multi-node on loopback: two torchrun "nodes" (one process each) meet through the c10d rendezvous
on 127.0.0.1 and must compute what one node with two processes computes (ZeRO-3, fp32, gloo).

* the elastic worker (tests/scripts/elastic_worker.py): full parameters, Adam moments and losses;
* the trainer (rectok_fast/train.py --stage tokenizer --preset tiny, 3 steps): the logged losses.

The commands are the ones the README's multi-node section shows (node_rank 0 and 1 on one machine).
"""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORKER = os.path.join(ROOT, "tests", "scripts", "elastic_worker.py")
TRAIN = os.path.join(ROOT, "rectok_fast", "train.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", RECTOK_FAST_QUIET="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
    return env


def _fail(what, procs_out):
    lines = [ln for out in procs_out for ln in out.splitlines()
             if "Error" in ln or "[rank" in ln or "error" in ln.lower()]
    return f"{what}\n" + "\n".join(lines[-60:])


def two_nodes(script_argv, timeout=400):
    """torchrun --nnodes 2 --node_rank k --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint
    127.0.0.1:PORT, both "nodes" started at once on this machine."""
    port = random.randint(20000, 40000)
    procs = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"h8-{port}",
               "--max_restarts", "0"] + script_argv
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(_fail(f"two-node run failed: rc={[p.returncode for p in procs]}", outs))
    return outs


def one_node(script_argv, timeout=400):
    """torchrun --standalone --nproc_per_node 2"""
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2"] + script_argv, cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(_fail(f"one-node run failed: rc={r.returncode}", [r.stdout + r.stderr]))
    return r


def test_rendezvous_two_nodes_equal_one_node(tmp_path):
    args = [WORKER, "--zero", "3", "--global_batch", "8", "--micro", "2", "--steps", "3"]
    two_nodes(args + ["--out", str(tmp_path / "nodes.pt")])
    one_node(args + ["--out", str(tmp_path / "single.pt")])
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("nodes.pt", "single.pt"))
    assert a["world"] == b["world"] == 2 and a["optimizer_step"] == b["optimizer_step"] == 3
    assert a["seen"] == b["seen"]
    for s, loss in b["losses"].items():
        assert abs(a["losses"][s] - loss) <= 1e-6 * abs(loss)
    for key in ("params", "exp_avg", "exp_avg_sq"):
        for name, v in b[key].items():
            torch.testing.assert_close(a[key][name], v, rtol=1e-6, atol=1e-9, msg=f"{key} of {name}")


def _zero3_fp32_config(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 3.0,
           "bf16": {"enabled": False}, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    path = tmp_path / "ds_zero3_fp32.json"
    path.write_text(json.dumps(cfg))
    return str(path)


KEYS = ("loss", "discriminator_loss", "grad_norm")


def _rows(out_dir):
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if "loss" in r:
                rows[r["step"]] = r
    return rows


def _saved_world(out_dir):
    """The world size the trainer recorded in its last checkpoint (None if this trainer version does not)."""
    tags = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*", "trainer.pt")))
    return torch.load(tags[-1], weights_only=True).get("world") if tags else None


def test_trainer_two_nodes_equal_one_node(tmp_path):
    common = ["--stage", "tokenizer", "--preset", "tiny", "--max_steps", "3", "--seed", "5", "--no_progress",
              "--deepspeed_config", _zero3_fp32_config(tmp_path)]
    nodes_dir, single_dir = str(tmp_path / "nodes"), str(tmp_path / "single")
    two_nodes([TRAIN] + common + ["--output_dir", nodes_dir])
    one_node([TRAIN] + common + ["--output_dir", single_dir])
    a, b = _rows(nodes_dir), _rows(single_dir)
    assert sorted(b) == [1, 2, 3] and sorted(a) == [1, 2, 3], (sorted(a), sorted(b))
    for step in b:
        for key in KEYS:
            if key in b[step]:
                x, y = a[step][key], b[step][key]
                assert abs(x - y) <= 1e-5 * abs(y) + 1e-7, f"step {step} {key}: two nodes {x}, one node {y}"
    assert "loss" in b[1]
    for out_dir in (nodes_dir, single_dir):
        assert _saved_world(out_dir) in (2, None)
