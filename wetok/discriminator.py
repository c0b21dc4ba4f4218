"""PatchGAN discriminator (pix2pix NLayerDiscriminator as used by Open-MAGVIT2 / WeTok).

4x4 convs: stride 2 for the first ``n_layers`` convs, stride 1 for the last two; BatchNorm after
every conv except the first and the last (convs followed by BatchNorm have no bias);
LeakyReLU(0.2). Init: conv weights N(0, 0.02), conv biases 0, BatchNorm weights N(1, 0.02),
BatchNorm biases 0. A 256x256 input gives a 30x30 logit map.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1, h, w) patch logits."""
        return self.main(x)
