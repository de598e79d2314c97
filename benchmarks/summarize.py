"""Summarize pytest-benchmark JSON files from benchmarks/: first a one-screen summary (per benchmark group:
the fused path's p50, its fraction of the copy bandwidth measured in the same run, its speed-up over the
eager reference and over torch.compile(reference), and the issue-10 goal it is held to; the eager
per-call overhead as a multiple of torch.add; training steps), then every benchmark's p20/p50/p80.

    python benchmarks/summarize.py benchmarks/results/<run>/bench_*.json > summary.md

On a GPU the times are device times (benchmarks/timing.py); on CPU, host times of the CPU paths.
"""
from __future__ import annotations

import json
import sys

# issue 10 goals on an H200: op -> (fraction of copy, x eager, x compiled)
GOALS = {
    "cosine_distill_loss": (0.85, 3.0, 1.3),
    "flow_interpolate": (0.80, 3.0, 1.2),
    "posterior_flow_noise": (0.80, 3.0, 1.2),
    "adaln_modulate": (0.80, 2.5, 1.2),
    "gated_residual": (0.80, 2.5, 1.2),
}
TRAIN_GOAL = 1.1          # compiled training step with our ops vs the compiled reference step
OVERHEAD_GOAL = 1.5       # eager per-call time of a fused op on tiny tensors vs torch.add


def _impl(b: dict) -> str:
    info = b.get("extra_info") or {}
    impl = str(info.get("impl") or "")
    if impl:
        return {"reference": "eager", "compile": "compiled"}.get(impl, impl)
    name = b.get("name", "").lower()
    for key, impl in (("fused", "fused"), ("compile", "compiled"), ("eager", "eager"), ("reference", "eager")):
        if key in name:
            return impl
    return "?"


def _pct(data: list[float], q: float) -> float:
    s = sorted(data)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def percentiles(b: dict) -> tuple[float, float, float]:
    """(p20, p50, p80) seconds per call: the device clock's own figures when present, else the stats."""
    info, st = b.get("extra_info") or {}, b.get("stats") or {}
    if all(k in info for k in ("p20_s", "p50_s", "p80_s")):
        p = (info["p20_s"], info["p50_s"], info["p80_s"])
    else:
        data = st.get("data") or [st.get("median", float("nan"))]
        p = tuple(_pct(data, q) for q in (0.2, 0.5, 0.8))
    calls = info.get("calls_per_round") or 1
    return tuple(x / calls for x in p)


def _fmt_t(sec: float) -> str:
    return f"{sec * 1e6:.1f} us" if sec < 1e-3 else f"{sec * 1e3:.2f} ms"


def _ok(value: float | None, goal: float) -> str:
    if value is None:
        return ""
    return "ok" if value >= goal else "MISS"


def summarize(*paths: str) -> str:
    docs = [json.load(open(p)) for p in paths]
    benches = [b for d in docs for b in d.get("benchmarks", [])]
    cal = next((d["rectok_fast_calibration"] for d in docs if d.get("rectok_fast_calibration")), {})
    gpu = "copy_bytes_per_s" in cal and cal.get("timing", "").startswith("cuda")
    lines = [f"# Benchmarks: {cal.get('device', '?')} (torch {cal.get('torch')}, triton {cal.get('triton')})", ""]
    if gpu:
        lines.append(f"timing: {cal.get('timing', '?')}; copy {cal.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s, "
                     f"bf16 matmul {cal.get('bf16_matmul_flops_per_s', 0) / 1e12:.1f} TFLOP/s (measured in this run)")
    if not gpu:
        lines.append(f"timing: {cal.get('timing', '?')}. CPU run: host times of the CPU paths; no fractions of "
                     "copy; the kernel goals apply to a GPU (the overhead goal applies here too).")
    lines.append("")

    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b.get("name", "").split("[")[0], []).append(b)

    # ---------------------------------------------------------------- one-screen summary
    lines += ["## Summary", "", "| group | impl | p50 | of copy | x eager | x compiled | goal (copy / eager / compiled) |",
              "|---|---|---|---|---|---|---|"]
    overhead, train = [], []
    for g, items in groups.items():
        p50 = {}
        for b in items:
            p50.setdefault(_impl(b), percentiles(b)[1])
        info0 = items[0].get("extra_info") or {}
        if info0.get("overhead"):
            overhead.append((g, p50))
            continue
        if g.startswith("train step"):
            train.append((g, p50, items))
            continue
        main = "fused" if "fused" in p50 else ("compiled" if "compiled" in p50 else None)
        if main is None:
            continue
        fb = next(b for b in items if _impl(b) == main)
        info = fb.get("extra_info") or {}
        frac = info.get("fraction_of_copy")
        xe = p50["eager"] / p50[main] if "eager" in p50 else None
        xc = p50["compiled"] / p50[main] if "compiled" in p50 and main != "compiled" else None
        goal = GOALS.get(info.get("op"))
        gtxt = ""
        if main != "fused":
            gtxt = "(no fused run in this group)"
        elif goal and gpu:
            gtxt = f"{goal[0]:.0%} {_ok(frac, goal[0])} / {goal[1]}x {_ok(xe, goal[1])} / {goal[2]}x {_ok(xc, goal[2])}"
        elif goal:
            gtxt = f"{goal[0]:.0%} / {goal[1]}x / {goal[2]}x (GPU)"
        lines.append(f"| {g} | {main} | {_fmt_t(p50[main])} | {'' if frac is None else f'{frac:.0%}'} | "
                     f"{'' if xe is None else f'{xe:.2f}x'} | {'' if xc is None else f'{xc:.2f}x'} | {gtxt} |")
    if overhead:
        lines += ["", f"Eager per-call overhead on tiny tensors (goal: fused <= {OVERHEAD_GOAL}x torch.add):", "",
                  "| group | torch.add | reference | fused | fused / torch.add |", "|---|---|---|---|---|"]
        for g, p50 in overhead:
            ratio = p50["fused"] / p50["torch_add"] if "fused" in p50 and "torch_add" in p50 else None
            lines.append(f"| {g} | {_fmt_t(p50.get('torch_add', float('nan')))} | "
                         f"{_fmt_t(p50.get('eager', float('nan')))} | {_fmt_t(p50.get('fused', float('nan')))} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x {_ok(OVERHEAD_GOAL / ratio, 1.0)}'} |")
    if train:
        lines += ["", f"Training steps (goal: compiled with our ops >= {TRAIN_GOAL}x the compiled reference step):", "",
                  "| group | impl | p50 | img/s | vs eager reference | vs compiled reference |", "|---|---|---|---|---|---|"]
        for g, p50, items in train:
            base_e, base_c = p50.get("eager"), p50.get("compiled_reference")
            for b in items:
                impl, info = _impl(b), b.get("extra_info") or {}
                t = percentiles(b)[1]
                ips = f"{info['batch'] / t:.1f}" if info.get("batch") else ""
                ve = f"{base_e / t:.2f}x" if base_e and impl != "eager" else ""
                vc = f"{base_c / t:.2f}x" if base_c and impl != "compiled_reference" else ""
                if vc and gpu and impl == "compiled_fused":
                    vc += " " + _ok(base_c / t, TRAIN_GOAL)
                lines.append(f"| {g} | {impl} | {_fmt_t(t)} | {ips} | {ve} | {vc} |")

    # ---------------------------------------------------------------- details
    lines += ["", "## All benchmarks", "",
              "| group | benchmark | impl | p20 | p50 | p80 | of copy | of bf16 mm | timing | notes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for g, items in groups.items():
        for b in items:
            info = b.get("extra_info") or {}
            p20, p50, p80 = percentiles(b)
            frac_c = f"{info['fraction_of_copy']:.0%}" if "fraction_of_copy" in info else ""
            frac_m = f"{info['fraction_of_bf16_matmul']:.0%}" if "fraction_of_bf16_matmul" in info else ""
            notes = []
            if info.get("graph_capture_error"):
                notes.append(f"no graph: {info['graph_capture_error'][:60]}")
            if info.get("peak_memory_bytes"):
                notes.append(f"peak {info['peak_memory_bytes'] / 2**30:.2f} GiB ({info.get('peak_memory_kind', '')})")
            lines.append(f"| {g} | {b['name']} | {_impl(b)} | {_fmt_t(p20)} | {_fmt_t(p50)} | {_fmt_t(p80)} | "
                         f"{frac_c} | {frac_m} | {info.get('timing', '')} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarize(*sys.argv[1:]))
