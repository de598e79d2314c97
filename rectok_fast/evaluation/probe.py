"""Linear probe of the tokenizer latents (the paper's claim that the latent space is semantic).

Features: the posterior mean of every token (encoder, no masking), averaged over tokens -> (C,).
Split: per class, the samples in a fixed shuffled order (``--seed``); the last ``--holdout`` fraction
(at least one, and at least one left to train on) is held out. Recipe (fixed, so numbers compare):
features standardized with the training mean/std, a linear layer (C -> num_classes) trained by
full-batch L-BFGS on cross-entropy + ``PROBE_WEIGHT_DECAY`` * ||W||^2 for ``PROBE_ITERS`` steps in
float64 from zero weights. Reports top-1 accuracy on the held-out split.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from rectok_fast.evaluation.fidelity import EvalError

PROBE_WEIGHT_DECAY = 1e-4
PROBE_ITERS = 100


@torch.no_grad()
def pooled_latents(tokenizer, images_u8: torch.Tensor) -> torch.Tensor:
    """(B, C) token-averaged posterior means of uint8 (B, 3, H, W) images."""
    dev = next(tokenizer.parameters()).device
    x = images_u8.to(dev).float() / 127.5 - 1.0
    moments = tokenizer.encode_moments(x)              # (B, N, 2C): mean then log-variance
    return moments[..., : tokenizer.token_channels].float().mean(1).cpu()


def split_indices(labels: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions: per class a fixed shuffle, the last ceil(holdout * n) held out."""
    if not 0.0 < holdout < 1.0:
        raise EvalError(f"--holdout must be in (0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    train, test = [], []
    for c in sorted(by_class):
        idx = list(rng.permutation(by_class[c]))
        if len(idx) < 2:
            raise EvalError(f"class {c} has {len(idx)} image; the probe needs at least 2 per class")
        k = min(len(idx) - 1, max(1, math.ceil(holdout * len(idx))))
        train += idx[:-k]
        test += idx[-k:]
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """The fixed recipe; returns a function features -> logits."""
    x = feats.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=PROBE_ITERS, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, labels) + PROBE_WEIGHT_DECAY * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: ((f.double() - mean) / std) @ w + b


def probe_accuracy(feats: torch.Tensor, labels: torch.Tensor, holdout: float = 0.2, seed: int = 0) -> dict:
    """Train on one split, top-1 on the other; also reports chance (the majority class of the test split)."""
    labels = labels.long()
    train, test = split_indices(labels.tolist(), holdout, seed)
    num_classes = int(labels.max()) + 1
    predict = train_linear_probe(feats[train], labels[train], num_classes)
    pred = predict(feats[test]).argmax(1)
    top1 = float((pred == labels[test]).double().mean())
    counts = torch.bincount(labels[test], minlength=num_classes)
    return {"top1": top1, "chance": float(counts.max()) / len(test), "num_train": len(train),
            "num_test": len(test), "num_classes": num_classes, "feature_dim": int(feats.shape[1])}


def run(args) -> dict:
    """``evaluate probe``: pooled latents of a labelled folder / list, over all ranks, probe on rank 0."""
    import os

    from rectok_fast.evaluation import data_io
    from rectok_fast.evaluation import dist as edist
    from rectok_fast.evaluation.models import load_tokenizer
    rank, world, device = edist.setup(args.device)
    tok = load_tokenizer(args.tokenizer, args.tokenizer_model, args.tokenizer_weights, device)
    samples = data_io.load_samples(args.data_path, args.file_list, args.num_images)
    if len({label for _, label in samples}) < 2:
        raise EvalError("the probe needs labelled images of at least 2 classes (an ImageFolder tree "
                        "root/<class>/<image> or a 'path label' list)")
    idx, feats, labels = [], [], []
    for index, images, y in data_io.rank_loader(samples, tok.img_size, args.eval_bsz, rank, world, args.workers):
        idx.append(index)
        feats.append(pooled_latents(tok, images))
        labels.append(y)
    c = tok.token_channels
    rows = {"feats": torch.cat(feats) if feats else torch.zeros(0, c),
            "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)}
    _, rows = edist.gather_rows(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long), rows)
    result = {}
    if rank == 0:
        result = probe_accuracy(rows["feats"], rows["labels"], args.holdout, args.seed)
        result.update(tokenizer=os.path.abspath(args.tokenizer), num_images=len(samples))
        data_io.write_json(result, os.path.join(args.out_dir, "probe.json"))
    edist.shutdown()
    return result
