"""Reading compiled GPU code without a GPU: resource usage and SASS of sm_90 cubins.

Used by benchmarks/static_report.py. Everything here is plain text processing of what NVIDIA's
tools print (``cuobjdump -res-usage``, ``cuobjdump -sass``, ``ptxas -v``), plus the sm_90
occupancy rules and a Little's-law estimate of achievable bandwidth.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

# sm_90 (H100 / H200) per-SM limits (CUDA occupancy rules for compute capability 9.0).
SM90 = dict(regs_per_sm=65536, reg_alloc_unit=256, max_regs_per_thread=255, smem_per_sm=233472,
            smem_per_block_max=232448, smem_reserved_per_block=1024, threads_per_sm=2048,
            blocks_per_sm=32, warp_size=32)
# H200 SXM: datasheet bandwidth, the copy bandwidth measured on this workplace's H200s
# (~4.3 TB/s read + write, the H200 copy rate the device notes give), 132 SMs, and ~0.6 us loaded DRAM latency.
H200 = dict(name="H200 SXM", sms=132, peak_bytes_per_s=4.8e12, copy_bytes_per_s=4.3e12, latency_s=0.6e-6)


def tool(name: str) -> str | None:
    """``cuobjdump`` / ``ptxas`` / ``nvcc``: PATH, then /usr/local/cuda/bin, then the copies Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def run_tool(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> readable name without the parameter list (``ns::kernel<T, 8, true>``)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    res = {}
    for mangled, readable in zip(names, out):
        readable = re.sub(r"^void ", "", readable.strip())
        depth, cut = 0, len(readable)
        for i, ch in enumerate(readable):        # strip the trailing "(args)" at template depth 0
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        res[mangled] = readable[:cut]
    return res


# ----------------------------------------------------------------------------------- resource usage
def res_usage(cubin_or_so: str) -> dict[str, dict]:
    """function -> {regs, stack, shared, local} from ``cuobjdump -res-usage``."""
    text = run_tool([tool("cuobjdump"), "-res-usage", cubin_or_so])
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur:
            out[cur] = dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                            local=int(m.group(4)))
            cur = None
    return out


def ptxas_verbose(text: str) -> dict[str, dict]:
    """function -> {spill_stores, spill_loads, stack, regs} from ``ptxas -v`` output (nvcc -Xptxas -v)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
    return out


# --------------------------------------------------------------------------------------------- SASS
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_functions(cubin_or_so: str) -> dict[str, list[tuple[int, str]]]:
    """function -> list of (address, SASS instruction text with its predicate), from ``cuobjdump -sass``."""
    text = run_tool([tool("cuobjdump"), "-sass", cubin_or_so])
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return out


def _split(insn: str) -> tuple[str, list[str]]:
    insn = re.sub(r"^@!?U?P[T\d]+\s+", "", insn.strip())
    parts = insn.split(None, 1)
    ops = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    return parts[0], ops


def _access_width(opcode: str) -> int:
    for suffix in opcode.split(".")[1:]:
        if suffix in _WIDTH:
            return _WIDTH[suffix]
    return 4


def _regs(operand: str) -> set[int]:
    regs = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operand):
        r = int(m.group(1))
        regs.update((r, r + 1) if m.group(2) else (r,))
    return regs


@dataclass
class SassStats:
    loads: dict          # access bytes -> count of global loads (LDG, LDGSTS)
    stores: dict         # access bytes -> count of global stores (STG)
    spill_insns: int     # STL + LDL (local memory: spills or a run-time-indexed array)
    inflight_bytes_per_thread: int   # most load bytes issued before the first use of any of them
    barrier_in_load_loop: bool = False   # a loop that loads also waits on a block barrier (rows in series)

    def width_text(self) -> str:
        def one(d):
            if not d:
                return "-"
            total = sum(d.values())
            return "/".join(f"{w}B" + (f"x{c}" if len(d) > 1 else "") for w, c in sorted(d.items(), reverse=True)) \
                if len(d) > 1 else f"{next(iter(d))}B x{total}"
        return f"ld {one(self.loads)}; st {one(self.stores)}"


def _loops(code: list[tuple[int | None, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every backward branch's range."""
    out = []
    for addr, insn in code:
        op, operands = _split(insn)
        if addr is not None and op.split(".")[0] == "BRA" and operands:
            m = re.match(r"(?:`\()?0x([0-9a-f]+)", operands[-1])
            if m and int(m.group(1), 16) < addr:
                out.append((int(m.group(1), 16), addr))
    return out


def sass_stats(insns: list) -> SassStats:
    """Static counts, and the bytes in flight per thread: walk the code in order, keep the loads whose
    destination registers nothing has touched yet, and retire a load (with every older one: the
    scoreboard waits in order) at the first instruction that names one of its registers. Barriers and
    exits retire everything. An estimate: predicated-off loads count as issued, a loop's carried loads
    are seen once."""
    code = [i if isinstance(i, tuple) else (None, i) for i in insns]
    loop_ranges = _loops(code)
    sync_loop = any(
        any(lo <= a <= hi and _split(t)[0].startswith("BAR") for a, t in code if a is not None)
        and any(lo <= a <= hi and _split(t)[0].split(".")[0] in ("LDG", "LDGSTS") for a, t in code if a is not None)
        for lo, hi in loop_ranges)
    loads: dict[int, int] = {}
    stores: dict[int, int] = {}
    spills = 0
    pending: list[tuple[set[int], int]] = []     # (destination registers, bytes), oldest first
    best = 0
    for _addr, insn in code:
        op, operands = _split(insn)
        base = op.split(".")[0]
        if base in ("STL", "LDL"):
            spills += 1
        touched = set().union(*(_regs(o) for o in operands)) if operands else set()
        hit = max((i for i, (regs, _) in enumerate(pending) if regs & touched), default=-1)
        if hit >= 0:
            pending = pending[hit + 1:]
        if base in ("BAR", "EXIT", "RET", "DEPBAR", "BSYNC", "WARPSYNC", "MEMBAR"):
            pending = []
        if base in ("LDG", "LDGSTS"):
            w = _access_width(op)
            loads[w] = loads.get(w, 0) + 1
            if base == "LDG" and operands:
                first = re.match(r"R(\d+)", operands[0])
                if first:
                    r0 = int(first.group(1))
                    pending.append((set(range(r0, r0 + max(1, w // 4))), w))
            else:                                  # LDGSTS: global -> shared, waited on by DEPBAR
                pending.append((set(), w))
        elif base == "STG":
            w = _access_width(op)
            stores[w] = stores.get(w, 0) + 1
        best = max(best, sum(b for _, b in pending))
    return SassStats(loads, stores, spills, best, sync_loop)


# ------------------------------------------------------------------------------------ occupancy model
def blocks_per_sm(threads: int, regs: int, smem: int, lim=SM90) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them."""
    warps = math.ceil(threads / lim["warp_size"])
    regs_per_warp = math.ceil(max(regs, 1) * lim["warp_size"] / lim["reg_alloc_unit"]) * lim["reg_alloc_unit"]
    by = {
        "blocks": lim["blocks_per_sm"],
        "threads": lim["threads_per_sm"] // (warps * lim["warp_size"]),
        "regs": (lim["regs_per_sm"] // regs_per_warp) // warps,
        "smem": lim["smem_per_sm"] // (smem + lim["smem_reserved_per_block"]) if smem else lim["blocks_per_sm"],
    }
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter


def littles_law(*, threads: int, grid_blocks: int, occ_blocks: int, inflight_per_thread: int, dev=H200) -> dict:
    """Bytes in flight per SM at the launch, against the bandwidth-delay product per SM, and the fraction
    of copy bandwidth that Little's law allows (bandwidth = bytes in flight / latency, capped at copy)."""
    resident = min(float(occ_blocks), grid_blocks / dev["sms"])
    inflight_sm = resident * threads * inflight_per_thread
    bdp_peak = dev["peak_bytes_per_s"] * dev["latency_s"] / dev["sms"]
    bdp_copy = dev["copy_bytes_per_s"] * dev["latency_s"] / dev["sms"]
    return dict(resident_blocks_per_sm=resident, waves=grid_blocks / (occ_blocks * dev["sms"]) if occ_blocks else math.inf,
                inflight_bytes_per_sm=inflight_sm, bdp_bytes_per_sm=bdp_peak,
                inflight_over_bdp=inflight_sm / bdp_peak, predicted_fraction_of_copy=min(1.0, inflight_sm / bdp_copy))
