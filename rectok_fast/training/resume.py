"""Checkpoint folders that are either complete or ignored.

Layout under ``<output_dir>/checkpoints``::

    step_00000040/            one checkpoint (tag)
        G/ D/ ...             engine states (DeepSpeed folders or plain_state.pt), per-rank files
        trainer.pt            trainer state (step, data layout, counters; rank 0)
        ema.pt                EMA weights (rank 0)
        official.pth          official-format export (self-describing)
        COMPLETE              the manifest, written LAST by rank 0 after every rank hashed its own files:
                              JSON {files: {file: size}, sha256, step, samples_consumed, world_size, ...}
                              (:mod:`rectok_fast.training.manifest`)
    latest                    the tag of the newest complete checkpoint, replaced atomically

A checkpoint without COMPLETE, or whose files no longer match the manifest sizes (cut off or truncated
afterwards), is never taken: :func:`find_resume_tag` falls back to the newest valid one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

MARKER = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _manifest(folder: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == MARKER or f.startswith(".tmp_") or f.endswith(".tmp"):
                continue
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def mark_complete(root: str, tag: str, info: dict | None = None) -> None:
    """Rank 0, after every rank finished writing ``tag``: manifest marker, then the ``latest`` pointer."""
    folder = os.path.join(root, tag)
    _atomic_write_text(os.path.join(folder, MARKER), json.dumps({"files": _manifest(folder), **(info or {})}))
    _atomic_write_text(os.path.join(root, LATEST), tag)


def is_complete(root: str, tag: str) -> bool:
    folder = os.path.join(root, tag)
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, size in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def list_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isdir(os.path.join(root, t)))


def find_resume_tag(root: str) -> str | None:
    """The tag named by ``latest`` when complete, else the newest complete one, else None."""
    latest = os.path.join(root, LATEST)
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if TAG_RE.match(tag) and is_complete(root, tag):
            return tag
    for tag in reversed(list_tags(root)):
        if is_complete(root, tag):
            return tag
    return None


def is_milestone(root: str, tag: str) -> bool:
    """A checkpoint whose COMPLETE manifest says ``"milestone": true`` (kept for ever)."""
    try:
        with open(os.path.join(root, tag, MARKER)) as fh:
            return bool(json.load(fh).get("milestone", False))
    except (OSError, ValueError):
        return False


def prune(root: str, keep_last: int) -> None:
    """Delete old complete checkpoints, keeping the newest ``keep_last`` and every milestone;
    incomplete folders older than the newest complete one are removed too (leftovers of a crash)."""
    tags = list_tags(root)
    complete = [t for t in tags if is_complete(root, t)]
    if not complete:
        return
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    newest = complete[-1]
    for t in tags:
        if t in keep or t >= newest and t not in complete:
            continue
        if t in complete and is_milestone(root, t):
            continue
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
