"""How the benchmarks time one call, so that on a GPU they measure the kernels and not the host.

CUDA: the call is captured once in a CUDA graph (after warm-up on a side stream, so lazy
initialisation stays out of it). Each repeat writes a 256 MB buffer first (four times the H200's
60 MB L2, so no input is still cached), then replays the graph between two CUDA events; the
recorded time is the events' elapsed time. The flush runs ~80 us on the GPU, long enough for the
host to queue the events and the replay behind it: no launch gaps are timed. If the call cannot
be captured (a host sync inside, say), it runs 20 times back to back between the events instead,
and the time per call is reported with ``timing="eager x20"`` (L2 flushed before the first only).

CPU: pytest-benchmark's own host timer (the CPU paths are the only thing timed there).

:func:`measure` plugs the device clock into pytest-benchmark (its ``_timer``), so the JSON's
stats (min/median/data) are device seconds per call, and also stores p20/p50/p80 in extra_info.
"""
from __future__ import annotations

import statistics

import torch

FLUSH_BYTES = 256 << 20
BACK_TO_BACK = 20


def cuda() -> bool:
    return torch.cuda.is_available()


class _Flush:
    _buf = None

    @classmethod
    def run(cls):
        if cls._buf is None:
            cls._buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        cls._buf.fill_(1)


def _capture(fn, warmup: int):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:         # not capturable: fall back to back-to-back eager launches
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {exc}"[:200]
    torch.cuda.synchronize()
    return graph, None


class DeviceClock:
    """A clock that advances only by the device time of each timed call (see module doc)."""

    def __init__(self, fn, warmup: int = 3, graph: bool = True, calls: int = BACK_TO_BACK):
        self.fn = fn
        self.calls = calls
        self.elapsed = 0.0
        self.times: list[float] = []
        if graph:                     # warms up on a side stream, then captures
            self.graph, self.graph_error = _capture(fn, warmup)
        else:
            self.graph, self.graph_error = None, None
            for _ in range(warmup):
                fn()
        self.timing = ("cuda-graph replay, L2 flushed, CUDA events" if self.graph is not None
                       else f"eager x{calls} back-to-back, CUDA events")
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def now(self) -> float:
        return self.elapsed

    def release(self) -> None:
        self.graph = None
        self.fn = None

    def step(self) -> None:
        _Flush.run()
        self._start.record()
        if self.graph is not None:
            self.graph.replay()
            calls = 1
        else:
            for _ in range(self.calls):
                self.fn()
            calls = self.calls
        self._end.record()
        self._end.synchronize()
        dt = self._start.elapsed_time(self._end) / 1e3 / calls
        self.times.append(dt)
        self.elapsed += dt


def percentiles(times: list[float]) -> dict:
    s = sorted(times)

    def q(p):
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    return {"p20_s": q(0.2), "p50_s": q(0.5), "p80_s": q(0.8)}


def device_seconds(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median device time of one call (CUDA; the calibration uses it), host time on CPU."""
    if not cuda():
        import time
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    clock = DeviceClock(fn, warmup=warmup)
    for _ in range(reps):
        clock.step()
    clock.release()
    return statistics.median(clock.times)


def measure(benchmark, fn, *, rounds: int, warmup: int = 2, graph: bool = True, calls: int = BACK_TO_BACK) -> None:
    """Time ``fn`` (no arguments) with ``benchmark``: device clock on CUDA, host clock on CPU.
    ``graph=False``: ``calls`` eager calls per round instead of a graph replay (training steps: 1)."""
    if not cuda():
        benchmark.extra_info["timing"] = "host clock (CPU)"
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return
    clock = DeviceClock(fn, warmup=max(warmup, 1), graph=graph, calls=calls)
    benchmark.extra_info["timing"] = clock.timing
    if clock.graph_error:
        benchmark.extra_info["graph_capture_error"] = clock.graph_error
    benchmark._timer = clock.now      # pytest-benchmark reads durations from this clock (5.x: _timer)
    try:
        benchmark.pedantic(clock.step, rounds=rounds, warmup_rounds=1, iterations=1)
    finally:
        # pytest-benchmark keeps every fixture (and its timer) until the session ends: drop the graph, its
        # memory pool and the inputs now, or a suite of ~150 benchmarks holds them all at once.
        clock.release()
    benchmark.extra_info.update(percentiles(clock.times[-rounds:]))
