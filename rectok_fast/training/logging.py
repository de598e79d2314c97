"""Metrics: stdout lines, TensorBoard (CSV when tensorboard is not installed), a JSONL log that the
loss plot and the tests read, and the loss plot PNG. Only rank 0 writes."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time


class MetricLogger:
    def __init__(self, out_dir: str, enabled: bool = True, resume: bool = False, start_step: int = 0):
        """``resume``: keep the earlier rows up to ``start_step``; rows a killed run logged after its last
        checkpoint are dropped, since the resumed run logs those steps again."""
        self.enabled, self.out_dir = enabled, out_dir
        self.tb = None
        self.csv_path = None
        self._csv_fields = None
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.backend = "none"
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.jsonl_path):
            kept = [r for r in read_metrics(out_dir) if r.get("step", 0) <= start_step] if resume else []
            with open(self.jsonl_path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1 if resume else None)
            self.backend = "tensorboard"
        except Exception:  # tensorboard not installed
            self.csv_path = os.path.join(out_dir, "metrics.csv")
            self.backend = "csv"
        self._t0 = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        elif self.csv_path:
            if self._csv_fields is None:
                self._csv_fields = list(row)
                new = not os.path.exists(self.csv_path)
                with open(self.csv_path, "a", newline="") as fh:
                    if new:
                        csv.writer(fh).writerow(self._csv_fields)
            with open(self.csv_path, "a", newline="") as fh:
                csv.writer(fh).writerow([row.get(k, "") for k in self._csv_fields])

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_losses(out_dir: str, keys=None, path: str | None = None) -> str | None:
    """loss.png: every logged ``loss*`` series against the step. Returns the path (None without data)."""
    rows = read_metrics(out_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = keys or sorted({k for r in rows for k in r if k.startswith("loss") or k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_image_grid(rows, path: str, labels=None) -> str:
    """rows: list of (N,3,H,W) tensors in [0,1]; one row each -> PNG. ``labels`` (one per row) are
    written in a column on the left, so a reader knows which row is the input and which the output."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    grid = torch.cat([torch.cat(list(r.detach().float().clamp(0, 1).cpu()), dim=2) for r in rows], dim=1)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    if labels:
        if len(labels) != len(rows):
            raise ValueError(f"save_image_grid: {len(labels)} labels for {len(rows)} rows")
        row_h, pad = rows[0].shape[-2], 8
        width = pad + 6 * max(len(t) for t in labels)     # PIL's default bitmap font is ~6 px per char
        canvas = Image.new("RGB", (img.width + width, img.height), "white")
        canvas.paste(img, (width, 0))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(labels):
            draw.text((pad // 2, i * row_h + row_h // 2 - 5), text, fill="black")
        img = canvas
    img.save(path)
    return path
