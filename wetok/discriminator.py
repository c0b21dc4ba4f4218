"""PatchGAN discriminator (pix2pix NLayerDiscriminator as used by Open-MAGVIT2 / WeTok).

4x4 convs: stride 2 for the first ``n_layers`` convs, stride 1 for the last two; BatchNorm after
every conv except the first and the last (convs followed by BatchNorm have no bias);
LeakyReLU(0.2). Init: conv weights N(0, 0.02), conv biases 0, BatchNorm weights N(1, 0.02),
BatchNorm biases 0. A 256x256 input gives a 30x30 logit map.

``sync_bn=True`` (config ``loss.disc_sync_bn``): under DDP the BatchNorm statistics are those
of the global batch (:class:`GlobalBatchNorm2d`); off, each rank normalises with its own
batch, as the reference code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from wetok.distributed import AllReduceSum, world


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over all ranks' batches together.

    Per-channel sums of x and x^2 and the count are all-reduced in one differentiable call
    (mean = S1 / n, biased var = S2 / n - mean^2, fp32), so R ranks x batch b normalise as one
    process with batch R b. Works with gloo (CPU) and NCCL; torch.nn.SyncBatchNorm is GPU-only.
    Same parameters and buffers as BatchNorm2d (checkpoints are interchangeable); a plain
    BatchNorm2d in a single process, in eval mode, or without running statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and world() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)),
                           xf.new_full((1,), x.numel() // c)])
        total = AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean.square()
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        scale = self.weight.float() * torch.rsqrt(var + self.eps)
        shift = self.bias.float() - mean * scale
        return (xf * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 sync_bn: bool = False):
        super().__init__()
        norm = GlobalBatchNorm2d if sync_bn else nn.BatchNorm2d
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       norm(ndf * mult),
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
