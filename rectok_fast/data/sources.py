"""Where the training images come from: an ImageFolder tree, the official ``train.txt``, or the demo photos.

A listing is held as numpy arrays, never as a Python list of (str, int) tuples: one byte buffer with
the paths, start/end offsets and an int64 label array. For ImageNet (1.28M images) that is ~60 MB
instead of ~250 MB of Python objects, it is parsed vectorised (no per-line Python), and DataLoader
workers forked from the trainer share it without the copy-on-read refcount growth that lists of
Python strings suffer.

An ImageFolder tree is walked once and the listing is written, in the ``train.txt`` format, to a
listing cache (``listing_cache_dir``, normally beside the output), keyed by the tree's root and the
modification times of the root and its class folders. Later passes and runs (and the other ranks)
read that file; within one process the parsed listing is also memoised.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jfif")
DEMO_VIRTUAL_SIZE = 64          # samples per epoch of the demo source (random crops of the bundled photos)
LISTING_VERSION = 1
LISTING_WAIT_S = 600.0          # how long a rank > 0 waits for rank 0's listing before walking the tree itself

_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True     # the separators of str.split()


class DataError(RuntimeError):
    """Bad data arguments (missing folder, empty list, malformed train.txt line)."""


# -------------------------------------------------------------------------------------- the table
class SampleTable:
    """(path, label) samples as numpy arrays; ``table[i]`` -> (path, label) like a list of tuples.

    ``blob`` is a uint8 buffer, path ``i`` is ``blob[start[i]:end[i]]`` (UTF-8 / filesystem bytes),
    resolved against ``root`` (``os.path.join`` keeps absolute paths as they are).
    """

    __slots__ = ("blob", "start", "end", "labels", "root")

    def __init__(self, blob: np.ndarray, start: np.ndarray, end: np.ndarray, labels: np.ndarray, root: str = ""):
        self.blob, self.root = blob, root
        self.start, self.end = start.astype(np.int64, copy=False), end.astype(np.int64, copy=False)
        self.labels = labels.astype(np.int64, copy=False)

    @classmethod
    def from_pairs(cls, pairs, root: str = "") -> "SampleTable":
        paths = [os.fsencode(p) for p, _ in pairs]
        lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        end = np.cumsum(lengths)
        blob = np.frombuffer(b"".join(paths), dtype=np.uint8) if paths else np.zeros(0, np.uint8)
        return cls(blob, end - lengths, end, np.fromiter((int(l) for _, l in pairs), np.int64, len(pairs)), root)

    def __len__(self):
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        rel = os.fsdecode(self.blob[self.start[i]:self.end[i]].tobytes())
        return os.path.join(self.root, rel) if self.root else rel

    def __getitem__(self, i):
        if isinstance(i, slice):                     # a view, not a list
            return SampleTable(self.blob, self.start[i], self.end[i], self.labels[i], self.root)
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        return self.path(i), int(self.labels[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        if isinstance(other, SampleTable):
            other = list(other)
        return list(self) == list(other) if isinstance(other, list) else NotImplemented

    def fingerprint(self) -> str:
        """sha256 of the resolved listing (paths + labels), independent of how it was stored."""
        h = hashlib.sha256()
        h.update(os.fsencode(os.path.abspath(self.root) if self.root else ""))
        lengths = self.end - self.start
        h.update(lengths.tobytes())
        h.update(self.labels.tobytes())
        # the path bytes in listing order, gathered in blocks (bounded memory)
        for a in range(0, len(self), 65536):
            s, e = self.start[a:a + 65536], self.end[a:a + 65536]
            if len(s) and np.all(s[1:] == e[:-1]):
                h.update(self.blob[s[0]:e[-1]].data)
            else:
                for x, y in zip(s.tolist(), e.tolist()):
                    h.update(self.blob[x:y].data)
        return h.hexdigest()


# ------------------------------------------------------------------------------------- train.txt
def parse_file_list(data: bytes, where: str = "file list", root: str = "") -> SampleTable:
    """Parse "path label" lines (label = last whitespace-separated field, so paths may hold spaces;
    blank lines and '#' comments are skipped) without a Python loop over lines.

    Works on the positions of whitespace only (~2 per line), never on an index of every byte."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size == 0:
        raise DataError(f"{where} has no samples")
    ws = np.flatnonzero(arr <= 32)                    # candidates; a lookup table over every byte would
    ws = ws[_WS[arr[ws]]]                             # need an 8-byte index per byte (320 MB for ImageNet)
    if ws.size == 0:
        text = data[:200].decode(errors="replace")
        raise DataError(f"{where}:1: expected 'path label', got {text!r}")
    # runs of consecutive whitespace: run r covers [run_lo[r], run_hi[r])
    brk = np.flatnonzero(np.diff(ws) != 1) + 1
    run_lo = ws[np.concatenate(([0], brk))] if ws.size else ws
    run_hi = ws[np.concatenate((brk - 1, [ws.size - 1]))] + 1 if ws.size else ws

    def run_of(pos):                                  # run index of whitespace positions ``pos``
        return np.searchsorted(run_lo, pos, side="right") - 1

    nl = ws[arr[ws] == 10]
    line_end = nl if arr[-1] == 10 else np.append(nl, arr.size)
    line_start = np.concatenate(([0], line_end[:-1] + 1))
    ok_start = line_start < arr.size
    line_start, line_end = line_start[ok_start], line_end[ok_start]
    starts_space = _WS[arr[line_start]]
    first = line_start.copy()
    first[starts_space] = run_hi[run_of(line_start[starts_space])]
    keep = (first < line_end)
    keep[keep] = arr[first[keep]] != ord("#")
    lines = np.flatnonzero(keep)
    if lines.size == 0:
        raise DataError(f"{where} has no samples")
    first, line_start, line_end = first[lines], line_start[lines], line_end[lines]
    last = line_end - 1                               # last non-space of the line
    ends_space = _WS[arr[last]]
    last[ends_space] = run_lo[run_of(last[ends_space])] - 1
    k = np.searchsorted(ws, last) - 1
    sep = np.where(k >= 0, ws[np.maximum(k, 0)], -1)  # the whitespace before the label field
    ok = sep > first

    def line_text(i):
        return data[line_start[i]:line_end[i]].decode(errors="replace").strip()

    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where}:{lines[i] + 1}: expected 'path label', got {line_text(i)!r}")
    wmax = int((last - sep).max())
    labels = np.zeros(lines.size, dtype=np.int64)
    bad = np.zeros(lines.size, dtype=bool)
    for j in range(min(wmax, 19)):                    # one digit column at a time (bounded memory)
        at = last - j
        has = at > sep
        digit = arr[np.where(has, at, 0)].astype(np.int64) - 48
        bad |= has & ((digit < 0) | (digit > 9))
        labels += np.where(has, digit, 0) * 10 ** j
    if wmax > 18 or bad.any():
        i = int(np.flatnonzero(bad)[0]) if bad.any() else int(np.argmax(last - sep))
        label = data[sep[i] + 1:last[i] + 1].decode(errors="replace")
        raise DataError(f"{where}:{lines[i] + 1}: label {label!r} is not an integer >= 0")
    path_end = run_lo[run_of(sep)]
    return SampleTable(arr, first, path_end, labels, root)


def read_file_list(list_path: str, root: str | None = None) -> SampleTable:
    """The official ``train.txt``: one "path label" per line; relative paths resolve against ``root``
    (default: the list's folder)."""
    if not os.path.isfile(list_path):
        raise DataError(f"file list {list_path!r} does not exist")
    root = root if root is not None else os.path.dirname(os.path.abspath(list_path))
    with open(list_path, "rb") as fh:
        data = fh.read()
    return parse_file_list(data, list_path, root)


# ------------------------------------------------------------------------------------ ImageFolder
def _class_folders(root: str) -> list[os.DirEntry]:
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    return sorted((d for d in os.scandir(root) if d.is_dir()), key=lambda d: d.name)


def _walk_listing(root: str, classes: list) -> bytes:
    """The tree as train.txt bytes ("class/.../file<TAB>label" lines, sorted)."""
    out, dropped = [], 0
    if classes:
        for label, c in enumerate(classes):
            base = os.path.join(root, c)
            for dirpath, dirnames, files in os.walk(base, followlinks=True):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, root)
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        if "\n" in f or f != f.strip():
                            dropped += 1     # cannot round-trip through a "path label" line
                            continue
                        out.append(os.fsencode(os.path.join(rel_dir, f)) + b"\t%d\n" % label)
    else:
        out = [os.fsencode(f) + b"\t0\n" for f in sorted(os.listdir(root))
               if f.lower().endswith(IMG_EXTENSIONS) and "\n" not in f and f == f.strip()]
    if dropped:
        warnings.warn(f"{dropped} image names under {root!r} contain a newline or edge whitespace; skipped")
    return b"".join(out)


def listing_key(root: str) -> str:
    """Identifies the state of a tree cheaply: root path + mtimes of the root and its class folders
    (adding or removing an image changes its folder's mtime). Images in nested sub-folders of a class
    are not covered; delete the listing cache after changing those."""
    root = os.path.abspath(root)
    h = hashlib.sha256(f"v{LISTING_VERSION}\0{root}\0{os.stat(root).st_mtime_ns}".encode())
    for d in _class_folders(root):
        h.update(f"\0{d.name}\0{d.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _listing_header(root: str, classes: list) -> bytes:
    return (f"# rectok_fast listing v{LISTING_VERSION}\n# root {os.path.abspath(root)}\n"
            f"# classes {len(classes)}\n").encode()


def _read_listing_cache(path: str, root: str):
    with open(path, "rb") as fh:
        data = fh.read()
    head = data[:4096].split(b"\n")
    if len(head) < 3 or not head[0].startswith(b"# rectok_fast listing") or not head[2].startswith(b"# classes "):
        raise DataError(f"{path} is not a rectok_fast listing")
    return parse_file_list(data, path, root), int(head[2].split()[2])


def list_image_folder(root: str, cache_dir: str | None = None, rank: int = 0,
                      wait_s: float = LISTING_WAIT_S) -> tuple[SampleTable, int]:
    """(samples, number of classes) of an ImageFolder tree (labels = index of the sorted class folder;
    images directly under ``root`` get label 0 when it has no class folders).

    With ``cache_dir``, rank 0 walks the tree once and writes ``listing-<key>.txt`` there; other ranks
    (and later passes and runs) read it, waiting up to ``wait_s`` for rank 0 before walking themselves.
    """
    root = os.path.abspath(root)
    classes = [d.name for d in _class_folders(root)]
    cache = os.path.join(cache_dir, f"listing-{listing_key(root)}.txt") if cache_dir else None
    if cache and rank != 0:
        deadline = time.monotonic() + wait_s
        while not os.path.exists(cache) and time.monotonic() < deadline:
            time.sleep(0.2)
    if cache and os.path.exists(cache):
        return _read_listing_cache(cache, root)
    body = _walk_listing(root, classes)
    if not body:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
    data = _listing_header(root, classes) + body
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, cache)
    return parse_file_list(data, f"listing of {root}", root), max(len(classes), 1)


# ----------------------------------------------------------------------------------------- source
@dataclass
class Source:
    """The samples of a dataset (a :class:`SampleTable`; a list of (path, label) is converted), or the
    demo photos when ``kind == 'demo'``."""
    kind: str                       # 'folder' | 'list' | 'demo'
    samples: SampleTable = field(repr=False)
    num_classes: int
    description: str

    def __post_init__(self):
        if not isinstance(self.samples, SampleTable):
            self.samples = SampleTable.from_pairs(list(self.samples))

    def __len__(self):
        return DEMO_VIRTUAL_SIZE if self.kind == "demo" else len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """(len,) int64 labels (zeros for the demo)."""
        return np.zeros(DEMO_VIRTUAL_SIZE, np.int64) if self.kind == "demo" else self.samples.labels

    def path(self, i: int) -> str:
        return self.samples.path(i)

    def fingerprint(self, seed: int = 0) -> str:
        """Identifies the images this source yields (the demo's random crops depend on the seed)."""
        if self.kind == "demo":
            return f"demo-v3-n{DEMO_VIRTUAL_SIZE}-seed{int(seed)}"
        return self.samples.fingerprint()


_SOURCES: dict = {}


def build_source(data_path: str | None = None, file_list: str | None = None,
                 listing_cache_dir: str | None = None, rank: int = 0) -> Source:
    """ImageFolder (``data_path``), official list (``file_list`` [+ ``data_path`` as its root]), or demo.

    Parsed listings are memoised per process (keyed by the list's mtime / the tree's listing key), so
    every pass of a run shares one listing."""
    if file_list:
        if not os.path.isfile(file_list):
            raise DataError(f"file list {file_list!r} does not exist")
        st = os.stat(file_list)
        key = ("list", os.path.abspath(file_list), data_path, st.st_mtime_ns, st.st_size)
        if key not in _SOURCES:
            samples = read_file_list(file_list, data_path)
            ncls = int(samples.labels.max()) + 1
            _SOURCES[key] = Source("list", samples, ncls,
                                   f"file list {file_list} ({len(samples)} images, {ncls} classes)")
        return _SOURCES[key]
    if data_path:
        if not os.path.isdir(data_path):
            raise DataError(f"data folder {data_path!r} does not exist")
        key = ("folder", os.path.abspath(data_path), listing_key(data_path))
        if key not in _SOURCES:
            samples, ncls = list_image_folder(data_path, listing_cache_dir, rank)
            _SOURCES[key] = Source("folder", samples, ncls,
                                   f"ImageFolder {data_path} ({len(samples)} images, {ncls} classes)")
        return _SOURCES[key]
    return Source("demo", SampleTable.from_pairs([]), 1,
                  f"demo: scikit-image sample photos, random crops ({DEMO_VIRTUAL_SIZE} per epoch)")
