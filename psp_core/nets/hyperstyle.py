"""HyperStyle (Alaluf et al., CVPR 2022): a W encoder's code decoded by a StyleGAN2 generator whose convolution
weights a hypernetwork offsets per image: the model's parts and calls. The refinement loop over them is
`psp_core.inference.hyperstyle`; the released files are read by `psp_core.nets.hyperstyle_checkpoints`."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from psp_core.nets.encoders import WEncoder
from psp_core.nets.hypernet import HYPERNETS, LayerShape
from psp_core.nets.stylegan2 import Generator
from psp_core.options import HYPERSTYLE_W_ENCODER, HyperStyleArchitecture

WeightOffsets = list[torch.Tensor | None]
"""One entry per modulated convolution of the generator (`Generator.modulated_convs` order): that layer's offsets
[N, out, in, k, k], or None where the layer is not tuned."""


def add_offsets(previous: Sequence[torch.Tensor | None] | None, new: WeightOffsets) -> WeightOffsets:
    """Offsets accumulated over iterations: `previous` + `new` per layer (None stays None; no previous: `new`)."""
    if previous is None:
        return list(new)
    return [None if old is None else old + delta for old, delta in zip(previous, new)]


class HyperStyle(nn.Module):
    """W encoder -> codes (+ latent_avg) -> generator whose weights are w * (1 + offset), the offsets predicted by the
    hypernetwork from the target beside the last output. A released file holds `hypernet.*` and `decoder.*`; the
    W encoder (`w_encoder.*`) comes from its own file."""

    def __init__(self, arch: HyperStyleArchitecture = HyperStyleArchitecture()):
        super().__init__()
        self.arch = arch
        self.n_styles = arch.n_styles
        self.decoder = Generator(arch.output_size, arch.style_dim, arch.n_mlp, arch.stylegan_channel_multiplier)
        shapes = [LayerShape(conv.out_channel, conv.in_channel, conv.kernel_size)
                  for conv in self.decoder.modulated_convs()]
        self.hypernet = HYPERNETS[arch.encoder_type](arch.input_nc, shapes, arch.layers_to_tune,
                                                     arch.encoder_input_size)
        self.w_encoder = WEncoder(input_nc=3, n_styles=self.n_styles)   # sees the target alone (RGB)
        self.w_encoder_file = HYPERSTYLE_W_ENCODER   # the file the W encoder comes from: a saved model's opts name it
        # Not in state_dict: the reference keeps it beside the weights as the checkpoint's `latent_avg`.
        self.register_buffer("latent_avg", None, persistent=False)

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Store the average latent as [n_styles, 512]; accepts [512], [1, 512] or [n_styles, 512]."""
        latent_avg = latent_avg.detach().float().reshape(-1, self.arch.style_dim)
        if latent_avg.shape[0] == 1:
            latent_avg = latent_avg.repeat(self.n_styles, 1)
        if latent_avg.shape[0] != self.n_styles:
            raise ValueError(f"latent_avg has {latent_avg.shape[0]} styles, the model has {self.n_styles}")
        self.latent_avg = latent_avg.to(self.decoder.input.input.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Target images [N, 3, E, E] (E the input size) -> the W encoder's codes plus latent_avg [N, n_styles, 512]."""
        if self.latent_avg is None:
            raise RuntimeError("the HyperStyle model has no latent_avg")
        codes = self.w_encoder(x)
        return codes + self.latent_avg.to(codes.dtype)

    def weight_offsets(self, x: torch.Tensor, last_output: torch.Tensor) -> WeightOffsets:
        """The hypernetwork's offsets for targets [N, 3, E, E] beside the last output (pooled here to E x E), E the
        input size (256 in the reference)."""
        side = self.arch.encoder_input_size
        last_output = F.adaptive_avg_pool2d(last_output, (side, side)).to(x.dtype)
        return self.hypernet(torch.cat([x, last_output.expand(x.shape[0], -1, -1, -1)], dim=1))

    def forward(self, x: torch.Tensor, last_output: torch.Tensor, codes: torch.Tensor,
                offsets: WeightOffsets | None = None, randomize_noise: bool = False) -> tuple[torch.Tensor, WeightOffsets]:
        """One refinement iteration: the hypernetwork's offsets for targets x [N, 3, E, E] beside the last
        output, added to `offsets` (the earlier iterations' sum), and the codes [N, n_styles, 512] decoded with
        them -> (images [N, 3, S, S], the summed offsets)."""
        offsets = add_offsets(offsets, self.weight_offsets(x, last_output))
        return self.decode(codes, offsets, randomize_noise=randomize_noise), offsets

    def decode(self, codes: torch.Tensor, offsets: Sequence[torch.Tensor | None] | None = None,
               randomize_noise: bool = False) -> torch.Tensor:
        """Codes [N, n_styles, 512] -> images [N, 3, S, S] from the generator with the given weight offsets (none:
        the plain generator); stored noise unless `randomize_noise`."""
        images, _ = self.decoder([codes], input_is_latent=True, randomize_noise=randomize_noise,
                                 weight_offsets=offsets)
        return images
