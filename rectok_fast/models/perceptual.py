"""Frozen perceptual networks of the reconstruction loss (spec 3): LPIPS-VGG and ConvNeXt-S logits.

Weights come only from local files: a torchvision ``vgg16`` state dict (``features.*`` keys), the LPIPS
linear heads ``vgg.pth`` (the one shipped inside the ``lpips`` pip package, ``lpips/weights/v0.1/vgg.pth``,
or the taming-transformers file; keys ``lin{k}.model.1.weight``), and a torchvision ``convnext_small``
state dict. Without them random stand-ins are built with a LOUD warning (values then mean nothing).
Submodule names mirror the official loss module so its ``perceptual_loss.*`` keys line up.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast.models.teacher import IMAGENET_MEAN, IMAGENET_STD, loud_warning

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG_CHANNELS = (64, 128, 256, 512, 512)
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))   # relu1_2 .. relu5_3
LPIPS_EPS = 1e-10


def _load_local(path):
    from rectok_fast.checkpoint import safe_torch_load
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


class VGGSlices(nn.Module):
    """torchvision VGG16 ``features`` cut into the five LPIPS slices (same layer indices inside)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        for i, (a, b) in enumerate(VGG_SLICES, start=1):
            s = nn.Sequential()
            for j in range(a, b):
                s.add_module(str(j), features[j])
            setattr(self, f"slice{i}", s)

    def forward(self, x):
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout (inactive: eval) + 1x1 conv to one channel without bias, as LPIPS."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))


def lpips_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors over channels: x / (||x||_2 + 1e-10) (eps added to the norm, as LPIPS)."""
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + LPIPS_EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG on [-1, 1] images; returns (B, 1, 1, 1): sum over 5 levels of the spatial mean of
    lin_k(|norm(f0) - norm(f1)|^2)."""

    def __init__(self, vgg_weights: str | None = None, lin_weights: str | None = None):
        super().__init__()
        # only VGG16's conv trunk: torchvision's vgg16() would also build (and initialise) its 120M-parameter
        # classifier, which LPIPS never uses
        from torchvision.models.vgg import cfgs, make_layers
        features = make_layers(cfgs["D"], batch_norm=False)
        for m in features.modules():
            if isinstance(m, nn.Conv2d):   # torchvision's VGG init, for the random stand-in
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if vgg_weights is not None:
            state = _load_local(vgg_weights)
            if any(k.startswith("features.") for k in state):
                state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            missing, unexpected = features.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise KeyError(f"{vgg_weights}: VGG16 features mismatch: missing {missing}, unexpected {unexpected}")
        else:
            loud_warning("LPIPS: VGG16 trunk has RANDOM weights (no vgg_weights file given); the perceptual "
                         "loss is meaningless. Tests/smoke runs only.")
        self.scaling_layer = ScalingLayer()
        self.net = VGGSlices(features)
        for k, c in enumerate(VGG_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        if lin_weights is not None:
            self._load_lins(lin_weights)
        else:
            loud_warning("LPIPS: linear heads are stand-ins (1/C each; no lin_weights file such as the lpips "
                         "package's weights/v0.1/vgg.pth given).")
            for k, c in enumerate(VGG_CHANNELS):
                nn.init.constant_(getattr(self, f"lin{k}").model[1].weight, 1.0 / c)
        self.requires_grad_(False)
        self.eval()

    def _load_lins(self, path):
        state = _load_local(path)
        for k, c in enumerate(VGG_CHANNELS):
            cands = [key for key in state if re.fullmatch(rf"(.*\.)?lin{k}\.(model\.\d\.)?weight", key)]
            if len(cands) != 1:
                raise KeyError(f"{path}: expected one 'lin{k}[.model.N].weight', found {cands}")
            w = state[cands[0]]
            if tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"{path}: {cands[0]} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
            getattr(self, f"lin{k}").model[1].weight.data.copy_(w)

    def train(self, mode: bool = True):
        return super().train(False)   # frozen; dropout must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f0, f1 = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        val = 0
        for k in range(len(VGG_CHANNELS)):
            d = (lpips_normalize(f0[k]) - lpips_normalize(f1[k])) ** 2
            val = val + getattr(self, f"lin{k}").model(d).mean(dim=(2, 3), keepdim=True)
        return val


def build_convnext_small(weights: str | None = None) -> nn.Module:
    """torchvision convnext_small with its full 1000-way classifier, frozen, eval."""
    from torchvision.models import convnext_small
    net = convnext_small(weights=None)
    if weights is not None:
        net.load_state_dict(_load_local(weights), strict=True)
    else:
        loud_warning("ConvNeXt-S has RANDOM weights (no convnext weights file given); its perceptual term is "
                     "meaningless. Tests/smoke runs only.")
    return net.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """(w_lpips * LPIPS + w_convnext * MSE(ConvNeXt logits)) / (w_lpips + w_convnext) on [0, 1] images
    (official string 'lpips-convnext_s-1.0-0.1'). Either network may be None (its term is dropped)."""

    def __init__(self, lpips: nn.Module | None, convnext: nn.Module | None, w_lpips: float = 1.0,
                 w_convnext: float = 0.1, convnext_size: int = 224):
        super().__init__()
        if lpips is None and convnext is None:
            raise ValueError("PerceptualLoss needs at least one of lpips / convnext")
        self.lpips = lpips
        self.convnext = convnext
        self.w_lpips, self.w_convnext = w_lpips, w_convnext
        self.convnext_size = convnext_size
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def lpips_term(self, inputs01, pred01):
        return self.lpips(inputs01 * 2 - 1, pred01 * 2 - 1).mean()

    def convnext_term(self, inputs01, pred01):
        s = self.convnext_size
        def prep(x):
            x = F.interpolate(x, size=s, mode="bilinear", antialias=True, align_corners=False)
            return (x - self.imagenet_mean) / self.imagenet_std
        return F.mse_loss(self.convnext(prep(inputs01)), self.convnext(prep(pred01)))

    def forward(self, inputs01: torch.Tensor, pred01: torch.Tensor) -> torch.Tensor:
        if inputs01.shape != pred01.shape:
            raise ValueError(f"perceptual loss: inputs {tuple(inputs01.shape)} vs prediction {tuple(pred01.shape)}")
        total, norm = 0.0, 0.0
        if self.lpips is not None:
            total = total + self.w_lpips * self.lpips_term(inputs01, pred01)
            norm += self.w_lpips
        if self.convnext is not None:
            total = total + self.w_convnext * self.convnext_term(inputs01, pred01)
            norm += self.w_convnext
        return total / norm


def build_perceptual_loss(vgg_weights: str | None = None, lpips_lin_weights: str | None = None,
                          convnext_weights: str | None = None, use_convnext: bool = True,
                          w_lpips: float = 1.0, w_convnext: float = 0.1) -> PerceptualLoss:
    """The official perceptual loss from local weight files (random stand-ins, loudly, without)."""
    lp = LPIPS(vgg_weights, lpips_lin_weights)
    cn = build_convnext_small(convnext_weights) if use_convnext else None
    return PerceptualLoss(lp, cn, w_lpips, w_convnext)
