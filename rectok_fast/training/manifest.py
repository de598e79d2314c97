"""The manifest that makes a checkpoint folder complete, and its verification before a resume.

Protocol (all ranks call :func:`write_manifest` after writing their own files and a barrier):

1. every rank writes only its own shard files (DeepSpeed does: ``zero_pp_rank_<r>_...`` by rank r;
   rank 0 the unpartitioned files: model states, trainer state, EMA, export);
2. :func:`write_manifest`: each rank hashes the files it owns (by name, see :func:`owner_rank`; the
   hashing is spread over the ranks), rank 0 gathers the records and writes the manifest LAST,
   atomically (temporary file, fsync, rename). A folder without a manifest is not a checkpoint.

The manifest is the ``COMPLETE`` marker of :mod:`rectok_fast.training.resume` (same name, same
``files: {path: size}`` map, so ``resume.is_complete`` keeps working on it) with more keys:

    {"format": 1, "files": {rel: size}, "sha256": {rel: hex}, "owners": {rel: rank},
     "step": int, "samples_consumed": int, "world_size": int, "zero_stage": int, ...extra}

:func:`verify_manifest` refuses a folder whose files were truncated, are missing, were replaced by
files of another checkpoint (a shard from another step has the right size but not the right hash),
or that holds shard files the manifest does not list (a ``zero_pp_rank_2`` from a 3-process run
would make DeepSpeed's converter count three ranks). Every problem is listed in one message.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch.distributed as dist

MANIFEST = "COMPLETE"                 # the name resume.py reads
FORMAT = 1
_RANK_IN_NAME = re.compile(r"(?:^|_)(?:pp_)?rank_?(\d+)_")
# derived or temporary entries that are not part of a checkpoint
_IGNORED_SUFFIXES = (".tmp",)
_IGNORED_DIR_SUFFIXES = (".universal", ".universal.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint folder that must not be resumed from; the message lists every problem found."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def checkpoint_files(folder: str) -> list[str]:
    """Relative paths of the files that make up the checkpoint in ``folder`` (the manifest itself,
    temporary files and derived universal conversions excluded), sorted."""
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(_IGNORED_DIR_SUFFIXES))
        for f in files:
            if f == MANIFEST or f.startswith(".tmp") or f.endswith(_IGNORED_SUFFIXES):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, f), folder))
    return sorted(out)


def owner_rank(rel: str, world: int) -> int:
    """The rank that wrote (and hashes) ``rel``: the rank in DeepSpeed's per-rank file names
    (``zero_pp_rank_3_mp_rank_00_optim_states.pt`` -> 3), rank 0 for everything else."""
    m = _RANK_IN_NAME.search(os.path.basename(rel))
    r = int(m.group(1)) if m else 0
    return r if r < world else 0


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _atomic_write_json(path: str, obj: dict) -> None:
    from rectok_fast.checkpoint import atomic_write
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def write_manifest(folder: str, *, step: int, samples_consumed: int, zero_stage: int,
                   extra: dict | None = None) -> dict | None:
    """Collective; call on every rank after every rank finished writing into ``folder`` (this
    function starts with a barrier). Returns the manifest on rank 0, None elsewhere."""
    rank, world = _rank(), _world()
    if world > 1:
        dist.barrier()
    files = checkpoint_files(folder)
    mine = {}
    for rel in files:
        if owner_rank(rel, world) == rank:
            p = os.path.join(folder, rel)
            mine[rel] = (os.path.getsize(p), sha256_file(p), rank)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    manifest, error = None, None
    if rank == 0:
        merged = {k: v for part in parts for k, v in part.items()}
        missing = sorted(set(files) - set(merged))
        if missing:     # a rank's listing differed (not a shared filesystem?): no manifest
            error = f"{folder}: files no rank hashed: {missing}; is the output directory shared by all nodes?"
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    if rank == 0:
        manifest = {"format": FORMAT, "step": int(step), "samples_consumed": int(samples_consumed),
                    "world_size": world, "zero_stage": int(zero_stage),
                    "files": {k: v[0] for k, v in sorted(merged.items())},
                    "sha256": {k: v[1] for k, v in sorted(merged.items())},
                    "owners": {k: v[2] for k, v in sorted(merged.items())},
                    **(extra or {})}
        _atomic_write_json(os.path.join(folder, MANIFEST), manifest)
    if world > 1:
        dist.barrier()
    return manifest


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {MANIFEST} manifest; the checkpoint was never finished "
                              f"(interrupted while saving?)")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' map)")
    return manifest


def verify_manifest(folder: str, hashes: bool = True, expect: dict | None = None) -> dict:
    """Check ``folder`` against its manifest; return the manifest or raise :class:`CheckpointError`
    listing every problem: missing, truncated/resized, changed (sha256) and unlisted files, and
    manifest keys that differ from ``expect`` (e.g. ``{"zero_stage": 3}``). ``hashes=False`` checks
    sizes only (fast; does not catch a same-sized shard from another step)."""
    manifest = read_manifest(folder)
    problems = []
    sums = manifest.get("sha256", {}) if hashes else {}
    if hashes and "sha256" not in manifest:
        problems.append(f"the manifest (format {manifest.get('format', 0)}) has no sha256; sizes checked only")
    for rel, size in sorted(manifest["files"].items()):
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            problems.append(f"missing file {rel} (rank {manifest.get('owners', {}).get(rel, '?')})")
            continue
        got = os.path.getsize(p)
        if got != size:
            what = "truncated" if got < size else "grown"
            problems.append(f"{rel}: {got} bytes, the manifest says {size} ({what})")
            continue
        if rel in sums and sha256_file(p) != sums[rel]:
            problems.append(f"{rel}: content differs from the one written at step {manifest.get('step')} "
                            f"(sha256 mismatch; a file from another checkpoint?)")
    listed = set(manifest["files"])
    for rel in checkpoint_files(folder):
        if rel not in listed:
            problems.append(f"unlisted file {rel} (not written with this checkpoint; from another run or step?)")
    for key, want in (expect or {}).items():
        if manifest.get(key) != want:
            problems.append(f"{key} is {manifest.get(key)!r} in the manifest, expected {want!r}")
    if problems:
        raise CheckpointError(f"refusing checkpoint {folder} (step {manifest.get('step')}, world size "
                              f"{manifest.get('world_size')}, ZeRO-{manifest.get('zero_stage')}):\n  - "
                              + "\n  - ".join(problems))
    return manifest


def describe(manifest: dict) -> str:
    """One line for the resume report."""
    total = sum(manifest["files"].values())
    return (f"step {manifest.get('step')}, {manifest.get('samples_consumed')} samples consumed, saved on "
            f"{manifest.get('world_size')} processes with ZeRO-{manifest.get('zero_stage')}, "
            f"{len(manifest['files'])} files, {total / 2 ** 20:.1f} MiB")


def verify_collective(folder: str, hashes: bool = True, expect: dict | None = None) -> dict:
    """Collective :func:`verify_manifest`: rank 0 reads and hashes, every rank gets the manifest or
    raises the same :class:`CheckpointError`."""
    result = None
    if _rank() == 0:
        try:
            result = ("ok", verify_manifest(folder, hashes=hashes, expect=expect))
        except CheckpointError as exc:
            result = ("error", str(exc))
    if _world() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result[0] == "error":
        raise CheckpointError(result[1])
    return result[1]
