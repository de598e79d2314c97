"""The GPU suite's plumbing, checked without a GPU (CI also runs ``bash benchmarks/gpu_suite.sh --dry-run``,
which executes every step at tiny shapes).

* benchmarks/summarize.py on a hand-made GPU result: the fractions, speed-ups, goal verdicts and the
  overhead ratio it prints must be the ones the numbers give.
* benchmarks/timing.py: percentiles, and the device clock's control flow on a stand-in for torch.cuda (an L2
  flush before every graph replay, device time per call into pytest-benchmark, the eager x20 fallback when
  capture fails).
* benchmarks/gpu_suite.sh: valid bash, every step under a cap, results copied to $OUT after each step.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import summarize  # noqa: E402  (benchmarks/summarize.py)
import timing  # noqa: E402


def _bench(name, group, impl, p50, **info):
    return {"name": name, "group": group, "stats": {"median": p50, "data": [p50]},
            "extra_info": {"impl": impl, "p20_s": p50 * 0.9, "p50_s": p50, "p80_s": p50 * 1.1, **info}}


def _gpu_doc():
    copy = 4.0e12
    fused_t, nbytes = 40e-6, 130e6            # 130 MB in 40 us = 3.25 TB/s = 81 % of copy
    benches = [
        _bench("adaln-eager", "adaln fwd", "eager", 100e-6, op="adaln_modulate", bytes=nbytes),
        _bench("adaln-compiled", "adaln fwd", "compiled", 60e-6, op="adaln_modulate", bytes=nbytes),
        _bench("adaln-fused", "adaln fwd", "fused", fused_t, op="adaln_modulate", bytes=nbytes,
               fraction_of_copy=nbytes / fused_t / copy),
        _bench("ov-add", "overhead gated_residual nograd", "torch_add", 200 * 4e-6, overhead=True, calls_per_round=200),
        _bench("ov-fused", "overhead gated_residual nograd", "fused", 200 * 8e-6, overhead=True, calls_per_round=200),
        _bench("tr-cref", "train step ditdh_xl b32", "compiled_reference", 0.30, batch=32),
        _bench("tr-cfused", "train step ditdh_xl b32", "compiled_fused", 0.25, batch=32),
    ]
    cal = {"device": "NVIDIA H200", "copy_bytes_per_s": copy, "bf16_matmul_flops_per_s": 7.9e14,
           "timing": "cuda-graph replay, L2 flushed, CUDA events", "torch": "x", "triton": "y"}
    return {"benchmarks": benches, "rectok_fast_calibration": cal}


def test_summary_gives_fractions_speedups_and_verdicts(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_gpu_doc()))
    text = summarize.summarize(str(path))
    row = next(line for line in text.splitlines() if line.startswith("| adaln fwd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "fused" and cells[2] == "40.0 us" and cells[3] == "81%"
    assert cells[4] == "2.50x" and cells[5] == "1.50x"
    assert cells[6] == "80% ok / 2.5x ok / 1.2x ok"
    ov = next(line for line in text.splitlines() if line.startswith("| overhead gated_residual nograd |"))
    assert "4.0 us" in ov and "8.0 us" in ov and "2.00x MISS" in ov          # per call, 2x torch.add > 1.5x
    tr = next(line for line in text.splitlines() if "| compiled_fused |" in line)
    assert "1.20x ok" in tr and "128.0" in tr                                 # 0.30 / 0.25; 32 / 0.25 img/s
    assert "## All benchmarks" in text


def test_summary_says_when_a_goal_is_missed(tmp_path):
    doc = _gpu_doc()
    doc["benchmarks"][2]["extra_info"].update(p50_s=80e-6, fraction_of_copy=0.4)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    row = next(line for line in summarize.summarize(str(path)).splitlines() if line.startswith("| adaln fwd |"))
    assert "80% MISS / 2.5x MISS / 1.2x MISS" in row


def test_percentiles():
    p = timing.percentiles([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert (p["p20_s"], p["p50_s"], p["p80_s"]) == (3.0, 6.0, 9.0)


def test_suite_script_caps_every_step_and_saves_after_each():
    script = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
    subprocess.run(["bash", "-n", script], check=True)
    src = open(script).read()
    body = src[src.index("# 1. build"):].replace("\\\n", " ")      # join continued lines
    # every python invocation outside the summary goes through step/bench (which apply timeout and save)
    for line in body.splitlines():
        line = line.strip()
        if re.match(r"^\$PY\b", line):
            assert "summarize.py" in line, f"uncapped command in gpu_suite.sh: {line}"
    step_fn = src[src.index("step() {"):src.index("PYTEST=(")]
    assert "timeout -k" in step_fn and "save" in step_fn
    assert "RECTOK_REQUIRE_EXT=1" in src
    budget = int(re.search(r"echo 540 \|\| echo (\d+)", src).group(1))
    assert budget <= 480, "the GPU suite must fit in 8 minutes"


@pytest.mark.skipif(not os.environ.get("RECTOK_TEST_DRY_RUN"), reason="CI runs the dry run from .ci/run; "
                    "set RECTOK_TEST_DRY_RUN=1 to run it here (1-3 minutes)")
def test_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["OUT"] = str(tmp_path / "out")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_suite.tgz", "suite.log", "summary.md"]


class _FakeCuda:
    """Stands in for torch.cuda so that the device clock's control flow runs without a GPU: each event
    records a fake device timestamp; each kernel 'call' advances it by 2 ms."""

    def __init__(self, capture_fails: bool):
        self.now_ms, self.capture_fails, self.log = 0.0, capture_fails, []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = fake.now_ms

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return other.t - self.t

        class CUDAGraph:
            def replay(self):
                fake.log.append("replay")
                fake.now_ms += 2.0

        class _Ctx:
            def __init__(self, *a, **k):
                pass

            def __enter__(self):
                fake.log.append("capture")
                if fake.capture_fails:
                    raise RuntimeError("operation not permitted when stream is capturing")

            def __exit__(self, *exc):
                return False

        class Stream:
            def wait_stream(self, other):
                pass

        class _StreamCtx(_Ctx):
            def __enter__(self):
                return self

        self.Event, self.CUDAGraph, self.Stream = Event, CUDAGraph, Stream
        self.graph, self.stream = _Ctx, _StreamCtx

    def current_stream(self):
        return self.Stream()

    def synchronize(self):
        pass


class _FakeBenchmark:
    """The part of pytest-benchmark's fixture that timing.measure relies on (runner reads self._timer)."""

    def __init__(self):
        self.extra_info, self._timer, self.durations = {}, None, []

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        for i in range(warmup_rounds + rounds):
            t0 = self._timer()
            target()
            if i >= warmup_rounds:
                self.durations.append(self._timer() - t0)


@pytest.mark.parametrize("capture_fails", [False, True])
def test_device_clock_times_device_work_after_a_flush(monkeypatch, capture_fails):
    fake = _FakeCuda(capture_fails)
    monkeypatch.setattr(timing.torch, "cuda", fake)
    monkeypatch.setattr(timing, "cuda", lambda: True)
    monkeypatch.setattr(timing._Flush, "run", classmethod(lambda cls: fake.log.append("flush")))
    calls = []

    def fn():                       # an eager call of the op: 2 ms of device work
        calls.append(1)
        fake.now_ms += 2.0
    bench = _FakeBenchmark()
    timing.measure(bench, fn, rounds=4, warmup=2)
    assert bench.durations == pytest.approx([2e-3] * 4)          # device seconds per call, not host time
    assert bench.extra_info["p50_s"] == pytest.approx(2e-3)
    steps = [x for x in fake.log if x != "capture"]
    if capture_fails:                                             # eager fallback: 20 calls per repeat
        assert bench.extra_info["timing"].startswith("eager x20")
        assert "graph_capture_error" in bench.extra_info
        assert steps == ["flush"] * 5 and len(calls) == 2 + 5 * timing.BACK_TO_BACK   # 2 warm-up calls
    else:                                                         # a flush before every replay
        assert bench.extra_info["timing"].startswith("cuda-graph replay")
        assert steps == ["flush", "replay"] * 5
