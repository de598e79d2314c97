"""AdamW with the official weight-decay exclusions (builders.py / misc.py add_weight_decay).

A trainable parameter gets NO weight decay when it has fewer than 2 dims or its name contains any of
``NO_DECAY_SUBSTRINGS`` (plain substring match, as officially: e.g. ``patch_embed``, ``decoder_embed``,
``token_embedding``, ``positional_embedding``, ``mask_token``, every ``*norm*`` and ``*bias``).
"""
from __future__ import annotations

import torch

NO_DECAY_SUBSTRINGS = ("ln", "bias", "embedding", "norm", "gamma", "embed", "token", "diffloss")
BETAS = (0.9, 0.95)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(s in name for s in NO_DECAY_SUBSTRINGS)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups over the parameters that require grad: decayed and not decayed (names kept for logs)."""
    decay, no_decay, dn, nn_ = [], [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
            nn_.append(name)
        else:
            decay.append(p)
            dn.append(name)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": nn_})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": dn})
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    return groups


def build_adamw(module: torch.nn.Module, lr: float, weight_decay: float, device: torch.device | None = None):
    """torch AdamW, betas (0.9, 0.95), official groups. ``fused`` on CUDA."""
    groups = param_groups(module, weight_decay)
    for g in groups:
        g.pop("names")
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=weight_decay, fused=fused or None)
