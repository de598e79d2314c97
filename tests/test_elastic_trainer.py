"""Elastic and preemptible runs through the real trainer CLI (DeepSpeed launcher, ZeRO-2, gloo):

* SIGTERM in the middle of a step on ONE rank of a 2-process run: every rank finishes the step, a
  complete checkpoint of that step is written, the launcher exits with 75 and ``PREEMPTED`` names the
  checkpoint; ``--resume`` on 2 processes reproduces the uninterrupted run exactly.
* The same checkpoint resumed on 1 process: the global batch is kept (accumulation 1 -> 2), the LR
  schedule continues, and over the epoch every sample is trained on once (none twice, none skipped).
* ZeRO-3, 1 -> 2 processes: accumulation 2 -> 1, the optimizer resharded, the same samples and lr.
* A checkpoint mixing files of two steps is refused by its manifest (plain engine, in-process).

Ports 318xx. Helpers from tests/test_train_distributed.py.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from test_train_distributed import HOOKED, ds_config, launch, metrics

TIMING = ("time", "step_time", "images_per_s")


def _argv(tmp_path):
    # 8 steps of global batch 4 (2 processes x batch 2); the demo set holds fewer images than 8 x 4, so
    # the run crosses an epoch boundary after the resume (the data position must carry over)
    return ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "8",
            "--ckpt_every", "3", "--seed", "7", "--deepspeed_config", ds_config(tmp_path, 2), "--no_progress"]


def _samples(prefix):
    rows = []
    for r in range(2):
        path = f"{prefix}.rank{r}"
        if os.path.exists(path):
            with open(path) as fh:
                rows += [json.loads(line) for line in fh]
    return rows


def _manifest(out, tag):
    with open(os.path.join(out, "checkpoints", tag, "COMPLETE")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted 2-process run, and the same run SIGTERMed in the middle of step index 4."""
    tmp = tmp_path_factory.mktemp("elastic")
    argv = _argv(tmp)
    full, cut = str(tmp / "full"), str(tmp / "cut")
    launch(2, 31841, argv + ["--output_dir", full], env={"RECTOK_FAST_TEST_LOG_SAMPLES": str(tmp / "full_samples")},
           script=HOOKED)
    r = launch(2, 31842, argv + ["--output_dir", cut], check=False, script=HOOKED,
               env={"RECTOK_FAST_TEST_SIGTERM_AT_STEP": 4, "RECTOK_FAST_TEST_SIGTERM_RANK": 1,
                    "RECTOK_FAST_TEST_LOG_SAMPLES": str(tmp / "cut_samples")})
    return {"tmp": tmp, "argv": argv, "full": full, "cut": cut, "sigterm": r}


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_in_flight_and_resumes_exactly(runs):
    r, cut, full = runs["sigterm"], runs["cut"], runs["full"]
    assert r.returncode == 75, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert "SIGTERM" in r.stdout + r.stderr or "stop signal" in r.stdout + r.stderr
    # the step in flight (index 4 -> 5 finished steps) completed on both ranks and was checkpointed
    assert open(os.path.join(cut, "PREEMPTED")).read().strip() == "step_00000005"
    assert open(os.path.join(cut, "checkpoints", "latest")).read().strip() == "step_00000005"
    m = _manifest(cut, "step_00000005")
    assert (m["step"], m["samples_consumed"], m["world_size"], m["zero_stage"]) == (5, 20, 2, 2)
    assert sorted(metrics(cut)) == [1, 2, 3, 4, 5]
    work = str(runs["tmp"] / "cut_2")
    shutil.copytree(cut, work)
    r = launch(2, 31843, runs["argv"] + ["--output_dir", work, "--resume"])
    assert "resumed from" in r.stdout and "at step 5" in r.stdout
    assert not os.path.exists(os.path.join(work, "PREEMPTED"))
    a, b = metrics(full), metrics(work)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        for k in a[s]:
            if k not in TIMING:
                assert a[s][k] == pytest.approx(b[s][k], rel=1e-5, abs=1e-7), (s, k, a[s][k], b[s][k])


@pytest.mark.slow
def test_resume_two_processes_on_one_keeps_global_batch_and_data_position(runs):
    work = str(runs["tmp"] / "cut_1")
    shutil.copytree(runs["cut"], work)
    os.remove(os.path.join(work, "checkpoints", "step_00000005", "COMPLETE"))  # resume from step 3 instead
    log = str(runs["tmp"] / "one_samples")
    r = launch(1, 31844, runs["argv"] + ["--output_dir", work, "--resume"], script=HOOKED,
               env={"RECTOK_FAST_TEST_LOG_SAMPLES": log})
    text = r.stdout + r.stderr
    assert "global batch 4 kept on 1 processes x --batch_size 2 x --grad_accum 2 (saved on 2 processes)" in text
    assert "resumed from" in text and "at step 3" in text
    assert "resharded from 2 to 1 processes" in text
    a, b = metrics(runs["full"]), metrics(work)
    assert sorted(b) == list(range(1, 9))
    for s in range(4, 9):   # the schedule continues: same lr and epoch at every step
        assert b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-12) and b[s]["epoch"] == pytest.approx(a[s]["epoch"])
    m = _manifest(work, "step_00000008")
    assert (m["samples_consumed"], m["global_batch"], m["world_size"]) == (32, 4, 1)
    # the data: each optimizer step after the resume trains on exactly the samples of the same step
    # of the uninterrupted 2-process run (same global order), split differently over micro batches
    full = _samples(str(runs["tmp"] / "full_samples"))
    one = _samples(log)
    assert {row["step"] for row in one} == set(range(3, 8))
    for s in range(3, 8):
        got = sorted(i for row in one if row["step"] == s for i in row["indices"])
        want = sorted(i for row in full if row["step"] == s for i in row["indices"])
        assert len(got) == 4 and got == want, (s, got, want)


def test_resume_refuses_a_mixed_checkpoint(tmp_path):
    """One process, plain engine, in-process: a checkpoint whose trainer state was swapped for the one of
    an earlier step (same size, so the size check passes) is refused by name, before anything loads."""
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.manifest import CheckpointError
    from rectok_fast.training.trainer import run
    out = str(tmp_path / "run")
    argv = ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "4", "--ckpt_every", "2",
            "--keep_last", "3", "--output_dir", out, "--no_progress"]
    run(parse_config(argv))
    ck = os.path.join(out, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000004"
    m = _manifest(out, "step_00000004")
    assert (m["step"], m["samples_consumed"], m["world_size"], m["engine"]) == (4, 8, 1, "plain")
    a, b = os.path.join(ck, "step_00000002", "trainer.pt"), os.path.join(ck, "step_00000004", "trainer.pt")
    assert os.path.getsize(a) == os.path.getsize(b)
    shutil.copyfile(a, b)
    with pytest.raises(CheckpointError, match=r"trainer\.pt: content differs.*sha256 mismatch"):
        run(parse_config(argv + ["--resume"]))


@pytest.mark.slow
def test_resume_one_process_on_two_zero3(tmp_path):
    """ZeRO-3, 1 -> 2 processes: a 1-process run with --grad_accum 2 (global batch 4) is killed after
    step 3 (checkpoint at 2); --resume on 2 processes without --grad_accum keeps the global batch with
    accumulation 1, reshards the optimizer, redoes step index 2 on the same samples with the same lr."""
    from test_train_distributed import ds_config as make_cfg
    cfg = make_cfg(tmp_path, 3)
    argv = ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "4", "--ckpt_every", "2",
            "--seed", "3", "--deepspeed_config", cfg, "--no_progress"]
    out, log = str(tmp_path / "run"), str(tmp_path / "samples")
    r = launch(1, 31845, argv + ["--grad_accum", "2", "--output_dir", out], check=False, script=HOOKED,
               env={"RECTOK_FAST_TEST_KILL_AT_STEP": 3, "RECTOK_FAST_TEST_LOG_SAMPLES": log + "_one"})
    assert r.returncode != 0
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        before = {row["step"]: row for row in map(json.loads, fh)}
    assert sorted(before) == [1, 2, 3]
    r = launch(2, 31846, argv + ["--output_dir", out, "--resume"], script=HOOKED,
               env={"RECTOK_FAST_TEST_LOG_SAMPLES": log + "_two"})
    text = r.stdout + r.stderr
    assert "global batch 4 kept on 2 processes x --batch_size 2 x --grad_accum 1 (saved on 1 processes)" in text
    assert "resharded from 1 to 2 processes" in text and "at step 2" in text
    after = metrics(out)
    assert sorted(after) == [1, 2, 3, 4] and after[3]["lr"] == pytest.approx(before[3]["lr"], rel=1e-12)
    one, two = _samples(log + "_one"), _samples(log + "_two")
    got = sorted(i for row in two if row["step"] == 2 for i in row["indices"])
    want = sorted(i for row in one if row["step"] == 2 for i in row["indices"])
    assert len(got) == 4 and got == want
    assert _manifest(out, "step_00000004")["world_size"] == 2
