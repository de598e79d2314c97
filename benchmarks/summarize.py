"""Summarize a pytest-benchmark JSON file: p20/p50/p80 per benchmark, fraction of the copy bandwidth
and of the bf16 matmul rate measured in the same run, and speed-up of the fused path over the eager
and compiled baselines within each benchmark group.

    python benchmarks/summarize.py benchmarks/results/<run>/bench_*.json > summary.md
"""
from __future__ import annotations

import json
import sys

IMPLS = ("fused", "compiled", "eager", "reference")


def _impl(b: dict) -> str:
    info = b.get("extra_info") or {}
    if info.get("impl"):
        impl = str(info["impl"])
        return {"reference": "eager", "compile": "compiled"}.get(impl, impl)
    name = b.get("name", "").lower()
    # The eager baseline is the reference op itself; "compile" marks torch.compile(reference).
    for key, impl in (("fused", "fused"), ("compile", "compiled"), ("eager", "eager"), ("reference", "eager"),
                      ("dali", "dali"), ("torch", "torch")):
        if key in name:
            return impl
    return "?"


def _pct(data: list[float], q: float) -> float:
    s = sorted(data)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(*paths: str) -> str:
    docs = [json.load(open(p)) for p in paths]
    doc = {"benchmarks": [b for d in docs for b in d.get("benchmarks", [])]}
    cal = next((d["rectok_fast_calibration"] for d in docs if d.get("rectok_fast_calibration")), {})
    lines = [f"# Benchmarks: {cal.get('device', '?')} (torch {cal.get('torch')}, triton {cal.get('triton')})", ""]
    if cal:
        lines.append(f"copy bandwidth {cal.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s, "
                     f"bf16 matmul {cal.get('bf16_matmul_flops_per_s', 0) / 1e12:.0f} TFLOP/s (measured in this run)")
        lines.append("")
    lines.append("| group | benchmark | impl | p20 ms | p50 ms | p80 ms | of copy | of bf16 mm | speed-up vs eager | vs compiled | notes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[str, list[dict]] = {}
    for b in doc.get("benchmarks", []):
        groups.setdefault(b.get("group") or b.get("name", "").split("[")[0], []).append(b)
    for g, items in groups.items():
        med = {}
        for b in items:
            med.setdefault(_impl(b), b["stats"]["median"])
        for b in items:
            st, info, impl = b["stats"], b.get("extra_info") or {}, _impl(b)
            data = st.get("data") or [st["median"]]
            p20, p50, p80 = (_pct(data, q) * 1e3 for q in (0.2, 0.5, 0.8))
            frac_c = f"{info['fraction_of_copy']:.0%}" if "fraction_of_copy" in info else ""
            frac_m = f"{info['fraction_of_bf16_matmul']:.0%}" if "fraction_of_bf16_matmul" in info else ""
            vs_e = f"{med['eager'] / st['median']:.2f}x" if "eager" in med and impl != "eager" else ""
            vs_c = f"{med['compiled'] / st['median']:.2f}x" if "compiled" in med and impl != "compiled" else ""
            notes = []
            if info.get("batch"):        # training steps: throughput and memory
                notes.append(f"{info['batch'] / st['median']:.1f} img/s")
            if info.get("peak_memory_bytes"):
                notes.append(f"peak {info['peak_memory_bytes'] / 2**30:.2f} GiB ({info.get('peak_memory_kind', '')})")
            lines.append(f"| {g} | {b['name']} | {impl} | {p20:.3f} | {p50:.3f} | {p80:.3f} | {frac_c} | {frac_m} "
                         f"| {vs_e} | {vs_c} | {'; '.join(notes)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(*sys.argv[1:]))
