"""Elastic resume (rectok_fast.training.elastic) and checkpoint manifests (rectok_fast.training.manifest).

Per ZeRO stage (2 and 3, fp32, gloo), one chain of four torchrun launches of
tests/scripts/elastic_worker.py (our DeepSpeedEngine: torch AdamW, two param groups, global batch 8):

  A  2 processes x micro 2 x accum 2: 6 uninterrupted steps, checkpoints after steps 3 and 5
  B  1 process  (accum 4): resumes A@3 (2 -> 1, universal), checkpoint after step 4, runs to 6
  C  2 processes (accum 2): resumes B@4 (1 -> 2, universal); rank 1 gets SIGTERM in the middle of
     step 5: both ranks finish the step, save step 5 and exit EXIT_PREEMPTED (torchrun reports 1)
  D  1 process: resumes C@5 (2 -> 1, universal), runs to 6

B and D must end where A ends: full fp32 parameters, Adam moments, the optimizer step count and the
per-group hyper-parameters (weight decay), within the float tolerance of a different reduction order
(measured ~1e-7 relative; DeepSpeed's unpatched ZeRO-3 universal load is off by ~1e-2, see
elastic.py). The losses after each resume match A's, and the samples of steps 1-3 (A), 4 (B), 5 (C)
and 6 (D) cover the epoch's first 48 samples exactly once (positions resume from samples consumed).
A's two checkpoints then give a real mixed checkpoint: step 3 with rank 1's shard from step 5.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from rectok_fast.training import manifest as M
from rectok_fast.training.elastic import recompute_grad_accum, resume_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORKER = os.path.join(ROOT, "tests", "scripts", "elastic_worker.py")
GLOBAL_BATCH, STEPS = 8, 6


def _torchrun(nproc, argv, timeout=300, expect_rc=0):
    port = random.randint(20000, 40000)
    env = dict(os.environ, OMP_NUM_THREADS="1", RECTOK_FAST_QUIET="1")
    cmd = [TORCHRUN, "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(port), WORKER, "--global_batch", str(GLOBAL_BATCH), "--micro", "2",
           "--steps", str(STEPS)] + argv
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != expect_rc:
        tail = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "[rank" in line or "Error" in line)
        raise AssertionError(f"rc={r.returncode}\n{tail[-6000:]}")
    return r


def _assert_same_state(ref, got, what):
    assert got["optimizer_step"] == ref["optimizer_step"] == STEPS, what
    assert [g["weight_decay"] for g in got["groups"]] == [g["weight_decay"] for g in ref["groups"]], what
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert set(got[key]) == set(ref[key])
        for name, a in ref[key].items():
            b = got[key][name]
            scale = a.abs().max().item()
            assert (a - b).abs().max().item() <= 2e-5 * scale + 1e-9, f"{what}: {key} of {name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_other_world_sizes(tmp_path, zero):
    z = ["--zero", str(zero)]
    a_out, b_out, c_out, d_out = (str(tmp_path / f"{n}.pt") for n in "abcd")
    _torchrun(2, z + ["--save_at", "3,5", "--ckpt_root", str(tmp_path / "a"), "--out", a_out])
    _torchrun(1, z + ["--resume", str(tmp_path / "a" / "step_00000003"), "--save_at", "4",
                      "--ckpt_root", str(tmp_path / "b"), "--out", b_out])
    _torchrun(2, z + ["--resume", str(tmp_path / "b" / "step_00000004"), "--preempt_step", "5",
                      "--preempt_rank", "1", "--ckpt_root", str(tmp_path / "c"), "--out", c_out], expect_rc=1)
    _torchrun(1, z + ["--resume", str(tmp_path / "c" / "step_00000005"), "--out", d_out])
    a, b, c, d = (torch.load(p, weights_only=True) for p in (a_out, b_out, c_out, d_out))

    assert (a["grad_accum"], b["grad_accum"], c["grad_accum"], d["grad_accum"]) == (2, 4, 2, 4)
    assert b["info"] == {"saved_world": 2, "world": 1, "how": "universal"}
    assert c["info"] == {"saved_world": 1, "world": 2, "how": "universal"}
    assert d["info"] == {"saved_world": 2, "world": 1, "how": "universal"}
    assert a["stopped_at"] is None and c["stopped_at"] == 5 and sorted(c["losses"]) == [5]
    assert sorted(os.listdir(tmp_path / "c")) == ["step_00000005"]
    _assert_same_state(a, b, f"ZeRO-{zero} 2 -> 1")
    _assert_same_state(a, d, f"ZeRO-{zero} 2 -> 1 -> 2 (SIGTERM) -> 1")
    for run, steps in ((b, (4, 5, 6)), (c, (5,)), (d, (6,))):
        assert sorted(run["losses"]) == list(steps)
        for s in steps:
            assert abs(run["losses"][s] - a["losses"][s]) <= 1e-5 * abs(a["losses"][s])
    chain = [i for s in (1, 2, 3) for i in a["seen"][s]] + b["seen"][4] + c["seen"][5] + d["seen"][6]
    assert sorted(chain) == list(range(STEPS * GLOBAL_BATCH))     # each sample once, none skipped

    # the manifests the worker wrote, and a real mixed checkpoint: rank 1's shard from step 5 in step 3
    m3 = M.verify_manifest(str(tmp_path / "a" / "step_00000003"), expect={"zero_stage": zero, "world_size": 2})
    assert m3["samples_consumed"] == 3 * GLOBAL_BATCH and m3["step"] == 3
    shard = [f for f in m3["files"] if "zero_pp_rank_1_" in f and f.endswith("optim_states.pt")]
    assert len(shard) == 1 and m3["owners"][shard[0]] == 1
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a" / "step_00000003", mixed,
                    ignore=shutil.ignore_patterns("*" + ".universal"))
    shutil.copyfile(tmp_path / "a" / "step_00000005" / shard[0], mixed / shard[0])
    assert os.path.getsize(mixed / shard[0]) == m3["files"][shard[0]]      # sizes alone cannot tell
    with pytest.raises(M.CheckpointError, match="sha256 mismatch") as err:
        M.verify_manifest(str(mixed))
    assert shard[0] in str(err.value)


# ---- recompute_grad_accum ----------------------------------------------------------------------------
def test_recompute_grad_accum_keeps_global_batch():
    assert recompute_grad_accum(64, 8, 2) == 4
    assert recompute_grad_accum(64, 8, 8) == 1
    assert recompute_grad_accum(64, 4, 1) == 16


def test_recompute_grad_accum_names_the_flags():
    with pytest.raises(ValueError) as err:
        recompute_grad_accum(24, 8, 2)                  # 24 % 16 != 0; micro 6 would fit
    msg = str(err.value)
    assert "global batch 24 on 2 processes with --batch_size 8" in msg
    assert "pass --batch_size 6 (then --grad_accum 2)" in msg
    with pytest.raises(ValueError, match="run on a number of processes that divides 40"):
        recompute_grad_accum(40, 8, 3)                  # no micro batch fits 3 processes
    with pytest.raises(ValueError, match="must all be >= 1"):
        recompute_grad_accum(64, 0, 2)


# ---- manifest, in process ----------------------------------------------------------------------------
def _fake_checkpoint(folder, world=2):
    (folder / "G").mkdir(parents=True)
    for r in range(world):
        (folder / "G" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * (1000 + r))
    (folder / "G" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
    (folder / "trainer.pt").write_bytes(b"t" * 50)


def test_manifest_accepts_complete_and_lists_every_problem(tmp_path):
    ck = tmp_path / "step_00000010"
    _fake_checkpoint(ck)
    with pytest.raises(M.CheckpointError, match="never finished"):
        M.verify_manifest(str(ck))
    written = M.write_manifest(str(ck), step=10, samples_consumed=640, zero_stage=2)
    assert written["files"]["G/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1001
    assert written["owners"]["G/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 0     # world 1 here: rank 0
    got = M.verify_manifest(str(ck), expect={"zero_stage": 2, "step": 10})
    assert got["samples_consumed"] == 640 and got["world_size"] == 1
    assert "640 samples consumed" in M.describe(got)
    (ck / "G.universal").mkdir()                        # derived conversions are not checkpoint files
    (ck / "G.universal" / "x.pt").write_bytes(b"x")
    M.verify_manifest(str(ck))

    # truncate one shard, replace another with same-sized foreign content, add a stray shard, drop a file
    with open(ck / "G" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as fh:
        fh.truncate(10)
    (ck / "G" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"\x07" * 1001)
    (ck / "G" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"\x02" * 1002)
    os.remove(ck / "trainer.pt")
    with pytest.raises(M.CheckpointError) as err:
        M.verify_manifest(str(ck), expect={"zero_stage": 3})
    msg = str(err.value)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: 10 bytes, the manifest says 1000 (truncated)" in msg
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: content differs" in msg
    assert "unlisted file G/zero_pp_rank_2_mp_rank_00_optim_states.pt" in msg
    assert "missing file trainer.pt" in msg
    assert "zero_stage is 2 in the manifest, expected 3" in msg
    assert msg.count("\n  - ") == 5


def test_manifest_sizes_only_and_garbage(tmp_path):
    ck = tmp_path / "ck"
    _fake_checkpoint(ck)
    M.write_manifest(str(ck), step=1, samples_consumed=8, zero_stage=1)
    (ck / "trainer.pt").write_bytes(b"u" * 50)          # same size, other content
    M.verify_manifest(str(ck), hashes=False)
    with pytest.raises(M.CheckpointError, match="trainer.pt: content differs"):
        M.verify_manifest(str(ck))
    (ck / M.MANIFEST).write_text("{not json")
    with pytest.raises(M.CheckpointError, match="unreadable manifest"):
        M.verify_manifest(str(ck))


def test_owner_rank():
    assert M.owner_rank("G/zero_pp_rank_3_mp_rank_00_optim_states.pt", 4) == 3
    assert M.owner_rank("G/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    assert M.owner_rank("G/mp_rank_00_model_states.pt", 4) == 0
    assert M.owner_rank("G/zero_pp_rank_5_mp_rank_00_optim_states.pt", 2) == 0     # not a rank of this world
    assert M.owner_rank("ema.pt", 2) == 0


def test_resume_plan_keeps_global_batch_and_position():
    saved = {"global_batch": 64, "samples_consumed": 640, "world_size": 2}
    plan = resume_plan(saved, micro_batch=8, world=1)
    assert plan["grad_accum"] == 8 and plan["start_step"] == 10
    assert "global batch 64 kept on 1 processes x --batch_size 8 x --grad_accum 8" in plan["message"]
    assert "saved on 2 processes" in plan["message"] and "after 640 samples" in plan["message"]
    assert resume_plan(saved, 8, 2, grad_accum=4)["grad_accum"] == 4
    with pytest.raises(ValueError, match="--grad_accum 2 would change the global batch from 64 to 32"):
        resume_plan(saved, 8, 2, grad_accum=2)
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        resume_plan({**saved, "samples_consumed": 650}, 8, 2)
    with pytest.raises(ValueError, match="--batch_size"):
        resume_plan(saved, 8, 3)
