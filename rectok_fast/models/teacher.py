"""Frozen foundation-model teachers for the semantic distillation (spec 2.4), built with timm.

Official default: DINOv3 ViT-L/16 (HF ``facebook/dinov3-vitl16-pretrain-lvd1689m``, 1 CLS + 4 register
tokens, hidden 1024). We run timm's equivalent architecture and accept weights ONLY from a local file:

* a timm-format state dict (``.pth``/``.bin``/``.safetensors``, optionally wrapped in
  'model_state_dict' / 'state_dict' / 'model'),
* the HF-format directory of the official bundle (``offline_models/dinov3_vit_large_patch16``:
  ``model.safetensors`` or ``pytorch_model.bin`` + ``preprocessor_config.json``), or a file with
  HF keys (including an official stage-1 RecTok checkpoint, whose ``sem_foundation_models.dinov3.*``
  keys are the HF teacher): converted by :func:`convert_hf_dinov3_to_timm`.

Without weights a randomly initialised stand-in is built and a LOUD warning says so: semantic targets
from it are meaningless (fine for tests and smoke runs only). Nothing is ever downloaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("rectok_fast.teacher")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_ARCH = {"dinov3": "vit_large_patch16_dinov3", "dinov2": "vit_large_patch14_dinov2"}
TEACHER_PATCH = {"dinov3": 16, "dinov2": 14}


def loud_warning(msg: str) -> None:
    """Warnings that must not be missed: Python warning + log + a banner on stderr."""
    banner = "!" * 100
    print(f"\n{banner}\n!!! {msg}\n{banner}\n", file=sys.stderr)
    logger.warning(msg)
    warnings.warn(msg, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# preprocessing


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> float tensor of uint8 levels trunc(255 * (x + 1) / 2), as the official
    ``(x_sem * 255).to(torch.uint8)`` (truncation, not rounding). Out-of-range inputs are clamped
    first (the official cast would wrap them)."""
    x01 = (images.float() + 1) * 0.5
    return (x01 * 255).clamp(0, 255).to(torch.uint8).float()


def _normalize_then_resize(x: torch.Tensor, out_size: int, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, then bilinear (no antialias) to ``out_size``: the shared tail of
    both teacher pipelines."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return F.interpolate((x - m) / s, size=(out_size, out_size), mode="bilinear", align_corners=False)


def dinov3_preprocess(images: torch.Tensor, out_size: int, resize: int = 224,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Official DINOv3 input: uint8 levels -> rescale 1/255 -> bilinear antialiased resize to
    ``resize`` (HF DINOv3ViTImageProcessorFast order: rescale, resize, normalize) -> ImageNet
    normalize -> bilinear (no antialias) back to ``out_size``."""
    x = to_uint8_levels(images) * (1.0 / 255.0)
    x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
    return _normalize_then_resize(x, out_size, mean, std)


def dinov2_preprocess(images: torch.Tensor, out_size: int, resize: int = 518,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Official DINOv2 path (not the default teacher): timm eval transform of the model's pretrained
    config on the float [0, 1] image (bicubic antialiased resize to ``resize``, crop_pct 1, ImageNet
    normalize), then bilinear to ``out_size`` = grid * 14. ``resize`` = 518 follows timm's
    ``vit_large_patch14_dinov2.lvd142m`` config; verify against your timm install."""
    x = (images.float() + 1) * 0.5
    x = F.interpolate(x, size=(resize, resize), mode="bicubic", align_corners=False, antialias=True)
    return _normalize_then_resize(x, out_size, mean, std)


# ----------------------------------------------------------------------------------------------
# the teacher module


class Teacher(nn.Module):
    """Frozen ViT: ``teacher(images in [-1, 1]) -> (B, grid*grid, D)`` patch features of the last
    layer after the final norm, CLS and register tokens dropped. Always eval, no grad."""

    def __init__(self, model: nn.Module, kind: str, img_size: int, patch_size: int = 16,
                 resize: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, random_weights: bool = False):
        super().__init__()
        if kind not in DEFAULT_ARCH:
            raise ValueError(f"unknown teacher kind {kind!r}; choose one of {tuple(DEFAULT_ARCH)}")
        self.model = model
        self.kind = kind
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.resize = resize if resize is not None else (224 if kind == "dinov3" else 518)
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_weights = random_weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)   # a teacher never leaves eval mode

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "dinov3":
            return dinov3_preprocess(images, self.img_size, self.resize, self.mean, self.std)
        return dinov2_preprocess(images, self.grid * 14, self.resize, self.mean, self.std)

    # no_grad, not inference_mode: the features are saved by the distillation loss's backward, which
    # inference tensors cannot be (it would need a copy of every feature map each step)
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        x = self.preprocess(images)
        feats = self.model.forward_features(x)
        feats = feats[:, self.num_prefix_tokens:]
        if feats.shape[1] != self.grid * self.grid:
            raise ValueError(f"teacher produced {feats.shape[1]} patch tokens, expected {self.grid ** 2}")
        return feats


# ----------------------------------------------------------------------------------------------
# HF DINOv3 -> timm key conversion

_HF_LAYER = re.compile(r"^layer\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
    "mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight", "mlp.down_proj.bias": "mlp.fc2.bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_HF_DROP = ("embeddings.mask_token",)   # pretraining only


def looks_like_hf_dinov3(state: dict) -> bool:
    return any(k.startswith("embeddings.") or k.startswith("layer.") for k in state)


def convert_hf_dinov3_to_timm(state: dict) -> dict:
    """HF ``DINOv3ViTModel`` keys -> timm ``vit_*_patch16_dinov3`` keys.

    q/k/v projections are concatenated into ``attn.qkv.weight`` (HF has no k bias: it is fixed at 0);
    q/v biases become ``attn.q_bias``/``attn.v_bias`` (used by the ``*_qkvb`` timm variants; the plain
    variants have no qkv bias, see :func:`load_teacher_state`). RoPE buffers and the pretraining mask
    token are dropped. Unknown keys raise, so a layout change cannot pass silently.
    """
    prefix = "sem_foundation_models.dinov3."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    out, qkv, unknown = {}, {}, []
    for k, v in state.items():
        if k in _HF_DROP or "rope" in k:
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _HF_RENAMES:
            out[f"blocks.{i}.{_HF_RENAMES[rest]}"] = v
        elif rest.startswith("attention.") and rest[len("attention."):][:6] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault(i, {})[rest[len("attention."):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"unrecognised HF DINOv3 keys ({len(unknown)}): {unknown[:20]}")
    for i, parts in sorted(qkv.items()):
        need = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
        missing = [p for p in need if p not in parts]
        if missing:
            raise KeyError(f"layer {i}: missing {missing} in the HF DINOv3 state dict")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[p] for p in need], 0)
        if "k_proj.bias" in parts and torch.count_nonzero(parts["k_proj.bias"]):
            raise ValueError(f"layer {i}: HF DINOv3 has a non-zero k bias, timm fixes it at 0")
        for name in ("q", "v"):
            if f"{name}_proj.bias" in parts:
                out[f"blocks.{i}.attn.{name}_bias"] = parts[f"{name}_proj.bias"]
    return out


def load_teacher_state(model: nn.Module, state: dict) -> None:
    """Strict load of a timm-keyed state into ``model``. q/v biases that the model does not have
    (plain ``vit_*_dinov3``: no qkv bias) must be all zero, which they are for the released ViT-S/B/L;
    otherwise use the ``*_qkvb`` architecture."""
    own = model.state_dict()
    state = dict(state)
    for k in [k for k in state if k.endswith((".q_bias", ".v_bias")) and k not in own]:
        if torch.count_nonzero(state[k]):
            raise ValueError(f"{k} is non-zero but the timm architecture has no qkv bias; "
                             f"build the teacher with the '*_qkvb' arch")
        del state[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise KeyError(f"teacher weights do not match the timm model: missing {missing[:20]}, "
                       f"unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}")
    model.load_state_dict(state, strict=True)


def _read_weight_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    from rectok_fast.checkpoint import safe_torch_load
    obj = safe_torch_load(path)
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return obj


def read_teacher_weights(path: str, kind: str = "dinov3") -> tuple[dict, dict]:
    """(timm-keyed state dict, preprocessing overrides) from a file or an HF-format directory."""
    path = os.fspath(path)
    pre = {}
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                state = _read_weight_file(os.path.join(path, name))
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this HF-format folder")
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            size = cfg.get("size") or {}
            if "height" in size:
                pre["resize"] = int(size["height"])
            elif "shortest_edge" in size:
                pre["resize"] = int(size["shortest_edge"])
            if "image_mean" in cfg:
                pre["mean"] = tuple(cfg["image_mean"])
            if "image_std" in cfg:
                pre["std"] = tuple(cfg["image_std"])
    elif os.path.isfile(path):
        state = _read_weight_file(path)
    else:
        raise FileNotFoundError(f"teacher weights not found: {path}")
    if (kind == "dinov3" and looks_like_hf_dinov3(state)) or any(k.startswith("sem_foundation_models.") for k in state):
        state = convert_hf_dinov3_to_timm(state)
    return state, pre


def build_teacher(kind: str = "dinov3", weights: str | None = None, img_size: int = 256,
                  arch: str | None = None, **timm_kwargs) -> Teacher:
    """Frozen teacher ``kind`` ('dinov3' default, 'dinov2') for ``img_size`` tokenizer images.

    ``weights``: local file or HF folder (see module doc); None -> random stand-in with a loud warning.
    ``arch``/``timm_kwargs`` select a smaller timm model for tests (e.g. depth=1, embed_dim=64).
    """
    import timm
    if kind not in DEFAULT_ARCH:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of {tuple(DEFAULT_ARCH)}")
    arch = arch or DEFAULT_ARCH[kind]
    kwargs = dict(pretrained=False, dynamic_img_size=True)
    if kind == "dinov3":
        kwargs["img_size"] = img_size
    kwargs.update(timm_kwargs)
    model = timm.create_model(arch, **kwargs)
    pre = {}
    if weights is None:
        loud_warning(f"teacher {kind} ({arch}) has RANDOM weights: no local weights file was given. Semantic "
                     f"targets are meaningless; use this only for tests/smoke runs.")
        random_weights = True
    else:
        state, pre = read_teacher_weights(weights, kind)
        load_teacher_state(model, state)
        random_weights = False
        logger.info("teacher %s (%s) loaded from %s", kind, arch, weights)
    patch = model.patch_embed.patch_size[0] if hasattr(model, "patch_embed") else TEACHER_PATCH[kind]
    if kind == "dinov3" and img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the teacher patch {patch}")
    return Teacher(model, kind, img_size, patch_size=16 if kind == "dinov2" else patch, random_weights=random_weights,
                   **pre)
