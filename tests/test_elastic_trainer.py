"""Elastic and preemptible runs through the real trainer CLI (DeepSpeed launcher, ZeRO-2, gloo):

* SIGTERM in the middle of a step on ONE rank of a 2-process run: every rank finishes the step, a
  complete checkpoint of that step is written, the launcher exits with 75 and ``PREEMPTED`` names the
  checkpoint; ``--resume`` on 2 processes reproduces the uninterrupted run exactly.
* The same checkpoint resumed on 1 process: the global batch is kept (accumulation 1 -> 2), the LR
  schedule continues, every micro batch after the resume holds the samples of the micro batch with the same
  global index m in the uninterrupted run, no sample is trained on twice in an epoch, and every logged
  value (losses, G and D gradient norms) equals the uninterrupted run's within the tolerance of another
  gradient reduction order.
* ZeRO-3, 1 -> 2 processes: accumulation 2 -> 1, the optimizer resharded; the same micro batches, no
  repeats and the same logged values (tolerance as above) as the uninterrupted 1-process run.
* A checkpoint mixing files of two steps is refused by its manifest (plain engine, in-process).

The tolerance: fp32 on CPU, the only difference after a world-size change is the order of the gradient
sums (one process accumulating 2 micro batches vs gloo averaging 2 ranks, ZeRO's partitioning of the
reduction): ~1e-7 relative per step (measured here: losses equal, gradient norms within 2e-7 over 5
steps), which Adam and more steps can grow; rtol 1e-4 leaves that margin and is far below what another
micro-batch split or other random draws give (measured with the former rank-interleaved plan and
(rank, micro step) seeds: 0.15% to 7% on the loss).

Ports 318xx. Helpers from tests/test_train_distributed.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from test_train_distributed import HOOKED, ds_config, launch, metrics

TIMING = ("time", "step_time", "images_per_s")


EPOCH_IMAGES = 20     # 5 steps of global batch 4 per epoch


def _image_folder(root):
    """An ImageFolder of EPOCH_IMAGES small random images (one class)."""
    import numpy as np
    from PIL import Image
    os.makedirs(os.path.join(root, "c0"))
    rng = np.random.default_rng(0)
    for i in range(EPOCH_IMAGES):
        img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        img.save(os.path.join(root, "c0", f"{i:02d}.png"))
    return root


def _argv(tmp_path):
    # 8 steps of global batch 4 (2 processes x batch 2) over EPOCH_IMAGES images: epoch 0 is steps 0-4, so
    # the runs resumed at step 3 (and at 5) cross an epoch boundary (the data position must carry over)
    return ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "8",
            "--ckpt_every", "3", "--seed", "7", "--deepspeed_config", ds_config(tmp_path, 2), "--no_progress",
            "--data_path", _image_folder(str(tmp_path / "images")), "--epochs", "2"]


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


LOSS_RTOL = 1e-4     # another gradient reduction order only; see the module doc


def _micro_batches(rows, step):
    """{global micro index m: dataset indices} of one optimizer step (every rank's record)."""
    out = {}
    for row in rows:
        if row["step"] == step:
            assert row["m"] not in out, ("micro batch trained twice", step, row)
            out[row["m"]] = row["indices"]
    return out


def _steps_per_epoch(text):
    m = re.search(r"(\d+) steps/epoch", text)
    assert m, text[-2000:]
    return int(m.group(1))


def _assert_no_repeats(rows, spe, global_batch, complete=()):
    """Every epoch's samples are distinct; the ``complete`` epochs train spe x global batch of them."""
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["step"] // spe, []).extend(row["indices"])
    for e, idx in by_epoch.items():
        assert len(idx) == len(set(idx)), ("a sample trained twice in epoch", e, sorted(idx))
        assert len(idx) == spe * global_batch or e not in complete, ("samples skipped in epoch", e, sorted(idx))


def _assert_same_logs(want, got, steps):
    """Every logged value (losses, gradient norms of G and D, lr, ...) but the timings, to LOSS_RTOL."""
    for s in steps:
        assert sorted(got[s]) == sorted(want[s]), s
        for k in want[s]:
            if k not in TIMING:
                assert got[s][k] == pytest.approx(want[s][k], rel=LOSS_RTOL), (s, k, want[s][k], got[s][k])


def test_micro_batches_do_not_depend_on_world_size():
    """In-process, no launcher (fast): the trainer's micro_batches over the loaders of 2 ranks x
    accumulation 1 and of 1 rank x accumulation 2 (global batch 4) hand out the same micro batch m (samples
    and flips) at every step, started at 0 or mid-epoch (a resume), across the epoch boundary."""
    from rectok_fast.data import TrainLoader, build_source
    from rectok_fast.training.trainer import micro_batches
    src = build_source()      # the demo source: 64 samples, 16 steps of 4 per epoch

    def steps(world, accum, start, total=18):
        loaders = [TrainLoader(src, 16, 2, rank=r, world=world, seed=3, num_workers=0) for r in range(world)]
        spe = loaders[0].steps_per_epoch // accum
        assert spe == 16
        return {step: {c["m"]: (c["indices"].tolist(), c["flipped"].tolist()) for c in chunks}
                for step, chunks in micro_batches(loaders, start, total, spe, accum, 0, world)}

    two, one = steps(2, 1, 14), steps(1, 2, 14)
    assert sorted(two) == [14, 15, 16, 17] and all(sorted(v) == [0, 1] for v in two.values())
    assert two == one
    assert {s: v for s, v in steps(1, 2, 12).items() if s >= 14} == two
    # epoch 1 (steps 16, 17) is a new permutation, and no sample repeats within epoch 0's last steps
    assert two[16] != steps(2, 1, 0, 2)[0]
    seen = [i for s in (14, 15) for idx, _ in two[s].values() for i in idx]
    assert len(seen) == len(set(seen)) == 8


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
    # the data: each micro batch after the resume (1 process, accumulation step a -> m = a) holds exactly
    # the samples of micro batch m of the same step of the uninterrupted 2-process run (rank r -> m = r)
    full = _samples(str(runs["tmp"] / "full_samples"))
    one = _samples(log)
    assert {row["step"] for row in one} == set(range(3, 8))
    for s in range(3, 8):
        got, want = _micro_batches(one, s), _micro_batches(full, s)
        assert sorted(got) == sorted(want) == [0, 1] and got == want, (s, got, want)
    # no sample twice in an epoch: the cut run's steps before the checkpoint + the resumed steps
    cut = [row for row in _samples(str(runs["tmp"] / "cut_samples")) if row["step"] < 3]
    assert {row["step"] for row in cut} == {0, 1, 2}
    assert _steps_per_epoch(text) == EPOCH_IMAGES // 4 == 5
    _assert_no_repeats(cut + one, 5, 4, complete=[0])
    # same micro batches and same random draws (keyed by m): the uninterrupted run's losses
    _assert_same_logs(a, b, range(4, 9))


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
    """ZeRO-3, 1 -> 2 processes: a 1-process run with --grad_accum 2 (global batch 4) is killed after its
    last step 4, before the final checkpoint (the last one is at step 2); --resume on 2 processes without
    --grad_accum keeps the global batch with accumulation 1, reshards the optimizer and redoes steps 3
    and 4: the same micro batches, lr and logged values as the killed (up to then uninterrupted) run, no
    sample twice in the epoch. (The discriminator's gradient norm here also caught ZeRO-3 keeping only the
    last micro batch's gradient of a module called outside its engine; see DeepSpeedEngine.backward.)"""
    from test_train_distributed import ds_config as make_cfg
    cfg = make_cfg(tmp_path, 3)
    argv = ["--preset", "tiny", "--stage", "tokenizer", "--batch_size", "2", "--max_steps", "4", "--ckpt_every", "2",
            "--seed", "3", "--deepspeed_config", cfg, "--no_progress"]
    out, log = str(tmp_path / "run"), str(tmp_path / "samples")
    r = launch(1, 31845, argv + ["--grad_accum", "2", "--output_dir", out], check=False, script=HOOKED,
               env={"RECTOK_FAST_TEST_KILL_AT_STEP": 4, "RECTOK_FAST_TEST_LOG_SAMPLES": log + "_one"})
    assert r.returncode != 0
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        before = {row["step"]: row for row in map(json.loads, fh)}
    assert sorted(before) == [1, 2, 3, 4]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_00000002"
    r = launch(2, 31846, argv + ["--output_dir", out, "--resume"], script=HOOKED,
               env={"RECTOK_FAST_TEST_LOG_SAMPLES": log + "_two"})
    text = r.stdout + r.stderr
    assert "global batch 4 kept on 2 processes x --batch_size 2 x --grad_accum 1 (saved on 1 processes)" in text
    assert "resharded from 1 to 2 processes" in text and "at step 2" in text
    after = metrics(out)
    assert sorted(after) == [1, 2, 3, 4]
    for s in (3, 4):
        assert after[s]["lr"] == pytest.approx(before[s]["lr"], rel=1e-12)
    one, two = _samples(log + "_one"), _samples(log + "_two")
    assert {row["step"] for row in two} == {2, 3}
    for s in (2, 3):    # 1 process: m = accumulation step; 2 processes: m = rank
        got, want = _micro_batches(two, s), _micro_batches(one, s)
        assert sorted(got) == [0, 1] and got == want, (s, got, want)
    _assert_no_repeats([row for row in one if row["step"] < 2] + two, _steps_per_epoch(text), 4)
    _assert_same_logs(before, after, (3, 4))
    assert _manifest(out, "step_00000004")["world_size"] == 2
