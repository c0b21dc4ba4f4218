"""Diagnostic: train with the quantiser replaced by the identity (a continuous latent), to tell
how much of a setting's slow learning is the encoder/decoder and how much the quantiser.

    python tools/continuous_latent.py --config-path $PWD/conf experiment=table06_gfq scale=short \
        train.compile=false train.device=cpu data.image_size=64 train.batch_size=8 train.steps=1500

The arguments are those of ``python -m wetok.train`` (``--config-path`` is needed because this
file is not in the package). z_q = u: no straight-through, commitment and entropy terms are zero;
indices are still sign bits so the records keep their shape. Not for results: a control only.
"""
import torch

from wetok import quantize
from wetok.train import main


def identity_quantizer(self, u, entropy=None):
    b, d, h, w = u.shape
    zero = torch.zeros((), device=u.device)
    bits = (u > 0).view(b, self.groups, self.group_dim, h, w).long()
    indices = (bits * self.bit_weights.view(1, 1, -1, 1, 1)).sum(2)
    return quantize.QuantizerOutput(z_q=u, indices=indices, commit_loss=zero,
                                    token_entropy=zero, codebook_entropy=zero)


if __name__ == "__main__":
    quantize.GroupQuantizer.forward = identity_quantizer
    main()
