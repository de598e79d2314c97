"""PatchGAN discriminator of the stage-1/2 GAN loss (spec 3), keys ``main.{0,2,3,5,6,8,9,11}``.

Default PyTorch init, BatchNorm in train mode (batch statistics) as officially. Input: [0, 1] images.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    """Conv(k4,s2)+LReLU, (n_layers-1) x [Conv(k4,s2,no bias)+BN+LReLU], Conv(k4,s1,no bias)+BN+LReLU,
    Conv(k4,s1) -> 1 logit per patch: (B, 1, 30, 30) for 256 px with the defaults."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
