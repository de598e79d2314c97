"""Static sm_90 performance report: what can be known about the kernels on an H200 without one.

    python benchmarks/static_report.py [--fast] [--out DIR]     (default DIR: benchmarks/results/static-sm90)

* Triton (kernels/*.py): every fused op of the registry (rectok_fast.ops.registry, family "triton") is
  called at its goal shapes (benchmarks/cases.py), forward and backward, on CPU tensors, with
  ``JITFunction.run`` replaced by a capture: each launch the real launcher makes (grid, num_warps,
  constexprs, argument types and alignment, exactly as on a GPU) is compiled for sm_90 with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and not run. Where a kernel
  module declares ``production_configs()``, each declared config must match a captured launch.
* CUDA (csrc/*.cu): each file is compiled with ``nvcc -arch=sm_90 -cubin -Xptxas -v`` (the flags of
  setup.py); the launches at the goal shapes come from ``rectok_fast.ops.adaln_ext.cuda_launch_plan``
  when the extension declares one, else from a mirror of today's launch code (see :func:`_mirror_plan`).

For each launch: registers per thread, spills (ptxas / STL+LDL in SASS), shared memory, blocks per SM
at the launch's block size (sm_90 limits: 65536 registers, 228 KB shared memory, 2048 threads, 32
blocks), the widths of the global loads and stores in SASS, the bytes each thread keeps in flight
(loads issued before the first use of any of them, see benchmarks/sass.py), bytes in flight per SM
against the H200 bandwidth-delay product (4.8 TB/s x 0.6 us / 132 SMs = 21.8 KB), and Little's law:
bandwidth = bytes in flight / latency, as a fraction of the copy bandwidth (4.3 TB/s measured), capped
at 1. These are predictions for a steady stream; they ignore launch and tail costs, which matter for
the kernels that move under a few MB (their "args MB" column says so).

Needs no GPU: Triton compiles for an absent target (``TRITON_INTERPRET`` is cleared in this process).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)   # before anything imports triton: real compilation, no interpreter

import argparse  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import cases  # noqa: E402  (benchmarks/cases.py: the goal shapes)
import sass  # noqa: E402
from torch_launches import TorchLaunches  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "static-sm90")
LAUNCH_S = 2e-6        # per-kernel launch + ramp + drain inside a CUDA graph (an estimate, not a reading)
MIN_BYTES: dict = {}   # (op, case) -> {phase: the op's minimal traffic}, from benchmarks/cases.py
PLAN_PROBLEMS: list = []


# ============================================================================ Triton: capture + compile
class _Capture:
    """Replaces ``JITFunction.run``: compiles each launch for sm_90 instead of running it."""

    def __init__(self, workdir: str):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.triton = triton
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.workdir = workdir
        self.launches: list[dict] = []
        self.context: dict = {}
        self._compiled: dict = {}

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self._orig = JITFunction.run
        cap = self

        def run(jit, *args, grid, warmup, **kwargs):
            return cap.launch(jit, args, kwargs, grid)
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig

    def launch(self, jit, args, kwargs, grid):
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        binder = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, spec, options)
        key = (jit.fn.__qualname__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)
        if key not in self._compiled:
            t0 = time.time()
            kern = self.triton.compile(ASTSource(jit, signature, constexprs, attrs), target=self.target,
                                       options=options.__dict__)
            path = os.path.join(self.workdir, f"{jit.fn.__name__}_{len(self._compiled)}.cubin")
            with open(path, "wb") as f:
                f.write(kern.asm["cubin"])
            self._compiled[key] = dict(cubin=path, shared=int(kern.metadata.shared), compile_s=time.time() - t0)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        tensors = {a.data_ptr(): a.nbytes for a in bound.values() if isinstance(a, torch.Tensor)}
        consts = {jit.arg_names[k[0]]: v for k, v in constexprs.items() if isinstance(v, (bool, int, float))}
        self.launches.append(dict(self.context, kernel=jit.fn.__name__, module=jit.fn.__module__, grid=grid,
                                  num_warps=options.num_warps, num_stages=options.num_stages, constexprs=consts,
                                  arg_bytes=sum(tensors.values()), **self._compiled[key]))
        return None


def _triton_ops():
    from rectok_fast.ops import registry
    return [(s.name, registry.resolve(s.fused)) for s in registry.OPS if s.family == "triton"]


def capture_triton(workdir: str, fast: bool) -> tuple[list[dict], list[dict], list[str]]:
    """All Triton launches of every registry op at its goal shapes (fast: one case per code path), and
    the other aten ops each phase runs (see benchmarks/torch_launches.py)."""
    problems = []
    by_public = {public: (op, cs) for op, (public, cs) in cases.KERNEL_CASES.items()}
    MIN_BYTES.clear()
    torch_ops = TorchLaunches()
    from rectok_fast.kernels import _launch
    from rectok_fast.ops import registry
    _launch.ticket_counter(torch.device("cpu"))     # allocated once per device and stream, not per call
    host_checked, registry.HOST_CHECKED_DEVICES = registry.HOST_CHECKED_DEVICES, ()   # CUDA's input checks
    with _Capture(workdir) as cap:
        for public, fused in _triton_ops():
            if public not in by_public:
                problems.append(f"{public}: no goal-shape case in benchmarks/cases.py")
                continue
            op, case_makers = by_public[public]
            chosen = [n for n in case_makers if not fast or n in cases.FAST_CASES]
            if not chosen:
                problems.append(f"{public}: none of its cases is in cases.FAST_CASES")
            for name in chosen:
                make = case_makers[name]
                case = make("cpu")
                MIN_BYTES[(public, name)] = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd}
                try:
                    cap.context = torch_ops.context = dict(op=public, case=name, phase="fwd")
                    with torch_ops.mode:
                        outs = case.call(fused)
                    cap.context = torch_ops.context = dict(op=public, case=name, phase="bwd")
                    outs, seeds = case.outputs_with_seeds(outs)
                    with torch_ops.mode:
                        torch.autograd.grad(outs, case.grad_inputs, seeds)
                except Exception as exc:       # report every op, even when one of them breaks
                    problems.append(f"{public} {name} ({cap.context['phase']}): {type(exc).__name__}: {exc}")
    registry.HOST_CHECKED_DEVICES = host_checked
    return cap.launches, torch_ops.ops, problems


def check_declared(launches: list[dict]) -> list[str]:
    """Each ``production_configs()`` entry of a kernel module must match a captured launch."""
    problems = []
    modules = {ln["module"] for ln in launches}
    for mod_name in sorted(modules):
        mod = sys.modules.get(mod_name)
        declared = getattr(mod, "production_configs", None)
        if not callable(declared):
            continue
        for cfg in declared():
            name = cfg.get("kernel") or getattr(cfg.get("fn"), "__name__", "?")
            want = {k: v for k, v in (cfg.get("constexprs") or {}).items() if isinstance(v, (bool, int, float))}
            hit = [ln for ln in launches if ln["kernel"] == name and ln["num_warps"] == cfg.get("num_warps", ln["num_warps"])
                   and all(ln["constexprs"].get(k) == v for k, v in want.items())
                   and (cfg.get("grid") is None or tuple(cfg["grid"]) == ln["grid"][:len(cfg["grid"])])]
            if not hit and any(ln["kernel"] == name for ln in launches):
                problems.append(f"{mod_name}.production_configs(): {name} {want} warps={cfg.get('num_warps')} "
                                f"grid={cfg.get('grid')} matches no launch seen at the goal shapes")
    return problems


# ============================================================================== CUDA: nvcc + launch plan
def _nvcc_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths
    site = os.path.dirname(os.path.dirname(torch.__file__))
    inc = include_paths() + glob.glob(os.path.join(site, "nvidia", "cu1*", "include")) + \
        [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    # the same code-generation flags as setup.py's CUDAExtension
    return ["-arch=sm_90", "-cubin", "-O3", "--use_fast_math", "-std=c++20", "-DRECTOK_FAST_WITH_CUDA=1",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-Xptxas", "-v"] + [f"-I{p}" for p in inc]


def compile_cuda(workdir: str) -> tuple[dict, list[str]]:
    """readable kernel name -> {file, mangled, regs, stack, shared, spills, sass stats}."""
    nvcc = sass.tool("nvcc")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    if not sources:
        return {}, []
    if nvcc is None:
        return {}, ["nvcc not found: the CUDA kernels (csrc/*.cu) were not analysed"]
    out = {}
    for src in sources:
        cubin = os.path.join(workdir, os.path.basename(src) + ".cubin")
        log = sass.run_tool([nvcc, *_nvcc_flags(), "-o", cubin, src])
        ptxas = sass.ptxas_verbose(log)
        res = sass.res_usage(cubin)
        code = sass.sass_functions(cubin)
        names = sass.demangle(list(res))
        for mangled, r in res.items():
            st = sass.sass_stats(code.get(mangled, []))
            pv = ptxas.get(mangled, {})
            out[" ".join(names[mangled].split())] = dict(
                file=os.path.relpath(src, ROOT), mangled=mangled, cubin=cubin, regs=r["regs"], stack=r["stack"],
                static_shared=r["shared"], local=r["local"], spill_bytes=pv.get("spill_stores", 0) + pv.get("spill_loads", 0),
                sass=st)
    return out, []


def _mirror_plan(op: str, B: int, N: int, D: int, mod: str) -> list[dict]:
    """Today's launches of csrc/ (adaln_cuda.cu, gated_residual_cuda.cu, cuda_utils.cuh), bf16 activations
    and bf16 modulation, vectorized rows, with the bytes each launch moves. Used only while adaln_ext
    declares no cuda_launch_plan (same entry format: phase, kernel, grid, block, smem, bytes)."""
    P, s = 8, 2
    threads = max(32, -(-(-(-D // P)) // 32) * 32)
    R = N if N < 32 else 32
    chunks = -(-N // R)
    bf = "c10::BFloat16"
    tok = mod == "token"
    row = B * N * D * s                              # one (B, N, D) bf16 tensor
    mod_b = row if tok else B * D * s                # one modulation chunk
    part = B * chunks * D * 4                        # fp32 partial rows of one column reduction

    def sum_partials(out_t, groups):
        return dict(phase="bwd", kernel=f"rectok::cuda::sum_partials_kernel<{out_t}>",
                    grid=(-(-D // 256), groups, 1), block=(256, 1, 1), smem=0,
                    bytes=part + groups * D * (4 if out_t == "float" else s))
    if op == "adaln_modulate":
        plan = [dict(phase="fwd", kernel=f"rectok::cuda::adaln_fwd_kernel<{bf}, {bf}, {P}, true>",
                     grid=(B * N, 1, 1), block=(threads, 1, 1), smem=0, bytes=2 * row + 2 * mod_b + 4 * D + 4 * B * N),
                dict(phase="bwd", kernel=f"rectok::cuda::adaln_bwd_kernel<{bf}, {bf}, {P}, true>",
                     grid=(chunks, B, 1), block=(threads, 1, 1), smem=0,
                     bytes=3 * row + mod_b + 4 * B * N + 4 * D + (2 * row if tok else 0) + part * (1 if tok else 3)),
                sum_partials("float", 1)]
        if not tok:
            plan += [sum_partials(bf, B), sum_partials(bf, B)]
        return plan
    plan = [dict(phase="fwd", kernel=f"rectok::cuda::gated_fwd_kernel<{bf}, {bf}, {bf}, {P}, true>",
                 grid=(B * N, 1, 1), block=(threads, 1, 1), smem=0, bytes=3 * row + mod_b),
            dict(phase="bwd", kernel=f"rectok::cuda::gated_bwd_kernel<{bf}, {bf}, {bf}, {P}, true>",
                 grid=(chunks, B, 1), block=(threads, 1, 1), smem=0,
                 bytes=3 * row + mod_b + (row if tok else part))]
    return plan + ([] if tok else [sum_partials(bf, B)])


def cuda_plan() -> tuple[list[dict], str]:
    """Launches of the CUDA ops at the goal shapes: [{op, case, phase, kernel, grid, block, smem}], source."""
    try:
        from rectok_fast.ops import adaln_ext
        declared = getattr(adaln_ext, "cuda_launch_plan", None)
    except Exception:               # the report must not need the built extension
        declared = None
    plan, source = [], "mirror of today's csrc launch code (adaln_ext declares no cuda_launch_plan)"
    for op in ("adaln_modulate", "gated_residual"):
        for case, (D, mod) in cases.ADALN_SHAPES.items():
            if declared is not None:
                source = "rectok_fast.ops.adaln_ext.cuda_launch_plan"
                try:
                    entries = declared(op, cases.B, cases.N, D, torch.bfloat16, mod == "token")
                except Exception as exc:      # a stale or missing extension: say so, never fall back silently
                    PLAN_PROBLEMS.append(f"adaln_ext.cuda_launch_plan({op}, D={D}, {mod}) failed: "
                                         f"{type(exc).__name__}: {exc}")
                    continue
            else:
                entries = _mirror_plan(op, cases.B, cases.N, D, mod)
            for e in entries:
                plan.append(dict(op=op, case=case, phase=e["phase"], kernel=" ".join(e["kernel"].split()),
                                 grid=tuple(e["grid"]) + (1,) * (3 - len(e["grid"])),
                                 block=tuple(e["block"]) if not isinstance(e["block"], int) else (e["block"], 1, 1),
                                 smem=int(e.get("smem", 0)), bytes=e.get("bytes")))
    return plan, source


# ======================================================================================== analysis
def _row(*, source, op, case, phase, kernel, grid, threads, regs, smem, spills, st: sass.SassStats,
         arg_bytes=None, extra=None) -> dict:
    blocks = grid[0] * grid[1] * grid[2]
    occ, limiter = sass.blocks_per_sm(threads, regs, smem)
    ll = sass.littles_law(threads=threads, grid_blocks=blocks, occ_blocks=occ,
                          inflight_per_thread=st.inflight_bytes_per_thread)
    return dict(source=source, op=op, case=case, phase=phase, kernel=kernel, grid=list(grid), threads=threads,
                regs=regs, spills=spills, smem=smem, blocks_per_sm=occ, occupancy_limiter=limiter,
                warps_per_sm=occ * threads // 32, loads=st.loads, stores=st.stores, widths=st.width_text(),
                barrier_in_load_loop=st.barrier_in_load_loop,
                inflight_bytes_per_thread=st.inflight_bytes_per_thread, arg_bytes=arg_bytes, **ll, **(extra or {}))


def _has_device_asserts(cubin: str) -> bool:
    """Whether the kernel can raise a device-side assert (it links the assert handler)."""
    with open(cubin, "rb") as f:
        return b"__assertfail" in f.read()


def analyse(fast: bool, workdir: str) -> dict:
    t0 = time.time()
    launches, torch_ops, problems = capture_triton(workdir, fast)
    unchecked = check_declared(launches)
    if not fast:                   # fast mode skips the D = 768 cases: their declared configs are unseen
        problems += unchecked
    rows, seen = [], set()
    stats_cache: dict = {}
    for ln in launches:
        key = (ln["kernel"], ln["case"], ln["phase"], ln["cubin"])
        if key in seen:
            continue
        seen.add(key)
        if ln["cubin"] not in stats_cache:
            res = next(iter(sass.res_usage(ln["cubin"]).values()))
            st = next(iter(sass.sass_functions(ln["cubin"]).values()))
            stats_cache[ln["cubin"]] = (res, sass.sass_stats(st))
        res, st = stats_cache[ln["cubin"]]
        rows.append(_row(source="triton", op=ln["op"], case=ln["case"], phase=ln["phase"], kernel=ln["kernel"],
                         grid=ln["grid"], threads=32 * ln["num_warps"], regs=res["regs"],
                         smem=max(res["shared"], ln["shared"]), spills=st.spill_insns + res["local"], st=st,
                         arg_bytes=ln["arg_bytes"],
                         extra=dict(num_warps=ln["num_warps"], num_stages=ln["num_stages"],
                                    constexprs=ln["constexprs"], compile_s=round(ln["compile_s"], 2),
                                    device_asserts=_has_device_asserts(ln["cubin"]))))
    t_triton = time.time() - t0

    kernels, cuda_problems = compile_cuda(workdir)
    problems += cuda_problems
    PLAN_PROBLEMS.clear()
    plan, plan_source = cuda_plan() if kernels else ([], "")
    problems += PLAN_PROBLEMS
    used = set()
    for p in plan:
        k = kernels.get(p["kernel"])
        if k is None:
            problems.append(f"CUDA launch plan names {p['kernel']}, which no csrc/*.cu file compiles")
            continue
        used.add(p["kernel"])
        st = k["sass"]
        rows.append(_row(source="cuda", op=p["op"], case=p["case"], phase=p["phase"], kernel=p["kernel"],
                         grid=p["grid"], threads=p["block"][0] * p["block"][1] * p["block"][2], regs=k["regs"],
                         smem=k["static_shared"] + p["smem"], spills=k["spill_bytes"] + st.spill_insns, st=st,
                         arg_bytes=p["bytes"], extra=dict(file=k["file"])))
    others = [dict(kernel=name, file=k["file"], regs=k["regs"], spills=k["spill_bytes"] + k["sass"].spill_insns,
                   smem=k["static_shared"], widths=k["sass"].width_text(),
                   inflight_bytes_per_thread=k["sass"].inflight_bytes_per_thread)
              for name, k in sorted(kernels.items()) if name not in used]
    for case, (D, mod) in cases.ADALN_SHAPES.items():
        for op in ("adaln_modulate", "gated_residual"):
            MIN_BYTES[(op, case)] = cases.adaln_bytes(op, D, mod, 2)[0]
    return dict(generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                fast=fast, device_model=sass.H200, sm90_limits=sass.SM90, goal_shapes=dict(B=cases.B, N=cases.N),
                torch=torch.__version__, triton=__import__("triton").__version__, cuda_plan_source=plan_source,
                seconds=dict(triton=round(t_triton, 1), total=round(time.time() - t0, 1)),
                launches=rows, torch_ops=torch_ops, per_op=per_op(rows, torch_ops), other_cuda_instances=others,
                problems=problems)


def per_op(rows: list[dict], torch_ops: list[dict] = ()) -> list[dict]:
    """Per op, case and phase: predicted time = sum over its launches of (launch cost + bytes / (Little's-law
    fraction x copy bandwidth)), plus, for each other aten op the phase runs (a torch kernel launch, e.g.
    a sum of partials), launch cost + its bytes at copy bandwidth; predicted fraction of copy = the op's
    minimal bytes at copy bandwidth / that."""
    copy = sass.H200["copy_bytes_per_s"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["phase"]), []).append(r)
    extra: dict = {}
    for o in torch_ops:
        extra.setdefault((o["op"], o["case"], o["phase"]), []).append(o)
    out = []
    for (op, case, phase), rs in groups.items():
        others = extra.get((op, case, phase), [])
        if any(r["arg_bytes"] is None for r in rs):
            continue
        need = MIN_BYTES.get((op, case), {}).get(phase)
        moved = [r["arg_bytes"] for r in rs]
        if len(rs) == 1 and need is not None:
            # one launch does the whole phase: it touches each tensor argument at most once, and fewer bytes
            # when it gathers rows through ids, so it moves min(all arguments, the op's minimal bytes)
            moved = [min(moved[0], need)]
        t = sum(LAUNCH_S + b / (max(r["predicted_fraction_of_copy"], 1e-3) * copy) for r, b in zip(rs, moved))
        t += sum(LAUNCH_S + o["bytes"] / copy for o in others)
        worst = max(zip(rs, moved), key=lambda rb: rb[1] / max(rb[0]["predicted_fraction_of_copy"], 1e-3))[0]
        n_launch = len(rs) + len(others)
        out.append(dict(op=op, case=case, phase=phase, launches=n_launch,
                        torch_launches=[o["aten"] for o in others], bytes_moved=sum(moved),
                        min_bytes=need, predicted_us=t * 1e6,
                        # the best this many launches can do: every byte at copy bandwidth, launch costs kept
                        launch_ceiling=None if need is None else need / copy / (need / copy + n_launch * LAUNCH_S),
                        ideal_us=None if need is None else need / copy * 1e6,
                        predicted_fraction_of_copy=None if need is None else need / copy / t,
                        slowest_launch=worst["kernel"]))
    return out


# ========================================================================================= output
def render(rep: dict) -> str:
    dm = rep["device_model"]
    bdp = dm["peak_bytes_per_s"] * dm["latency_s"] / dm["sms"]
    lines = [
        "# Static sm_90 report (no GPU): predicted H200 behaviour of every kernel at the goal shapes",
        "",
        f"Generated {rep['generated']} by `python benchmarks/static_report.py{' --fast' if rep['fast'] else ''}`"
        f" (torch {rep['torch']}, triton {rep['triton']}). Goal shapes: B = {rep['goal_shapes']['B']}, "
        f"N = {rep['goal_shapes']['N']} tokens (benchmarks/cases.py). CUDA launches: {rep['cuda_plan_source']}.",
        "",
        f"Model: {dm['name']}, {dm['sms']} SMs, bandwidth-delay product {dm['peak_bytes_per_s'] / 1e12:.1f} TB/s x "
        f"{dm['latency_s'] * 1e6:.1f} us / {dm['sms']} SMs = {bdp / 1024:.1f} KiB per SM; copy bandwidth "
        f"{dm['copy_bytes_per_s'] / 1e12:.1f} TB/s. *Little's law* = min(1, bytes in flight per SM x SMs / latency "
        "/ copy bandwidth): a steady-state bound from the SASS, not a measurement. Launch and tail costs are "
        "not in it; `args MB` (all tensor arguments) shows which launches are small enough for them to matter. "
        "(s): a loop of the kernel waits on a block barrier between its load batches (rows handled in series), "
        "so its loads are in flight only part of the time and the figure is optimistic.",
        "",
        "| src | op | case | phase | kernel | grid | thr | regs | spills | smem B | blk/SM (limit) | waves | "
        "global ld/st widths | in-flight B/thr | in-flight KiB/SM | vs BDP | Little's law % copy | args MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["launches"]:
        grid = "x".join(str(g) for g in r["grid"] if g != 1) or "1"
        kname = r["kernel"] if r["source"] == "triton" else re.sub(r"^rectok::cuda::", "", r["kernel"])
        lines.append(
            f"| {r['source']} | {r['op']} | {r['case']} | {r['phase']} | `{kname}` | {grid} | {r['threads']} | "
            f"{r['regs']} | {r['spills']} | {r['smem']} | {r['blocks_per_sm']} ({r['occupancy_limiter']}) | "
            f"{r['waves']:.2f} | {r['widths']} | {r['inflight_bytes_per_thread']} | "
            f"{r['inflight_bytes_per_sm'] / 1024:.1f} | {r['inflight_over_bdp']:.2f}x | "
            f"{r['predicted_fraction_of_copy']:.0%}{' (s)' if r['barrier_in_load_loop'] else ''} | "
            f"{'' if r['arg_bytes'] is None else format(r['arg_bytes'] / 1e6, '.1f')} |")
    lines += ["", "## Per op: predicted time at the goal shapes", "",
              f"Sum over the op's launches of {LAUNCH_S * 1e6:.0f} us (launch, ramp, drain: an estimate) + bytes / "
              "(Little's-law fraction x copy), plus the same launch cost + bytes at copy for every other torch op "
              "the phase runs (`torch ops`: a GPU kernel launch each, found by running the launchers under a "
              "dispatch mode). Bytes per launch: the launch plan's figure for CUDA; for a Triton "
              "phase done by one launch, min(all its tensor arguments once, the op's minimal bytes) (a gather "
              "through ids reads only the picked rows). `% copy` = the op's minimal bytes (benchmarks/cases.py) "
              "at copy bandwidth over the predicted time: the figure the GPU suite measures.", "",
              "`ceiling` = the same with every launch at 100 % of copy: what this many launches allow at best.", "",
              "| op | case | phase | launches | torch ops | MB moved | min MB | ideal us | predicted us | "
              "predicted % copy | ceiling | slowest launch |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in rep["per_op"]:
        frac = "" if o["predicted_fraction_of_copy"] is None else f"{o['predicted_fraction_of_copy']:.0%}"
        ideal = "" if o["ideal_us"] is None else f"{o['ideal_us']:.1f}"
        mn = "" if o["min_bytes"] is None else f"{o['min_bytes'] / 1e6:.1f}"
        tops = ", ".join(f"`{a}`" for a in o.get("torch_launches", [])) or "-"
        lines.append(f"| {o['op']} | {o['case']} | {o['phase']} | {o['launches']} | {tops} | "
                     f"{o['bytes_moved'] / 1e6:.1f} | "
                     f"{mn} | {ideal} | {o['predicted_us']:.1f} | {frac} | "
                     f"{'' if o['launch_ceiling'] is None else format(o['launch_ceiling'], '.0%')} | "
                     f"`{re.sub(r'^rectok::cuda::', '', o['slowest_launch'])}` |")
    if rep["other_cuda_instances"]:
        lines += ["", "Other compiled CUDA instances (not launched at the goal shapes: fp32 paths, unaligned fallbacks):", "",
                  "| kernel | file | regs | spills | smem B | global ld/st widths | in-flight B/thr |", "|---|---|---|---|---|---|---|"]
        for o in rep["other_cuda_instances"]:
            lines.append(f"| `{re.sub(r'^rectok::cuda::', '', o['kernel'])}` | {o['file']} | {o['regs']} | {o['spills']} | "
                         f"{o['smem']} | {o['widths']} | {o['inflight_bytes_per_thread']} |")
    below = [r for r in rep["launches"] if r["predicted_fraction_of_copy"] < 0.8]
    spilled = [r for r in rep["launches"] if r["spills"]]
    lines += ["", "## Against the goals (>= 80 % of copy predicted, zero spills)", ""]
    lines.append(f"- launches predicted below 80 %: {len(below)} of {len(rep['launches'])}"
                 + ("" if not below else ": " + ", ".join(sorted({f"`{r['kernel'].split('<')[0].split('::')[-1]}` "
                                                                  f"({r['case']} {r['phase']})" for r in below}))))
    lines.append(f"- launches with spills: {len(spilled)}"
                 + ("" if not spilled else ": " + ", ".join(sorted({r['kernel'] for r in spilled}))))
    slow_ops = [o for o in rep["per_op"] if o["predicted_fraction_of_copy"] is not None
                and o["predicted_fraction_of_copy"] < 0.8]
    lines.append(f"- op phases predicted below 80 % with launch costs (per-op table): {len(slow_ops)} of "
                 f"{len(rep['per_op'])}" + ("" if not slow_ops else ": " + ", ".join(
                     f"{o['op']} {o['case']} {o['phase']} {o['predicted_fraction_of_copy']:.1%}" for o in slow_ops)))
    bound = [o for o in slow_ops if o["launch_ceiling"] < 0.8]
    one_launch_mb = 0.8 / 0.2 * LAUNCH_S * rep["device_model"]["copy_bytes_per_s"] / 1e6
    lines.append(f"- of those, launch-bound (ceiling < 80 %: no kernel design with this many launches reaches 80 % "
                 f"under this model; one launch needs >= {one_launch_mb:.1f} MB): {len(bound)}"
                 + ("" if not bound else ": " + ", ".join(
                     f"{o['op']} {o['case']} {o['phase']} ({o['min_bytes'] / 1e6:.1f} MB: ideal {o['ideal_us']:.1f} us "
                     f"+ {o['launches']} x {LAUNCH_S * 1e6:.0f} us = "
                     f"{o['ideal_us'] + o['launches'] * LAUNCH_S * 1e6:.1f} us, ceiling {o['launch_ceiling']:.1%})"
                     for o in bound)))
    for p in rep["problems"]:
        lines.append(f"- PROBLEM: {p}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="one goal-shape case per code path (the test uses this)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="directory for report.md and report.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rectok_static_") as work:
        rep = analyse(args.fast, work)
    os.makedirs(args.out, exist_ok=True)
    md = render(rep)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
