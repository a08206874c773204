"""The pSp model: an encoder into W+ of a StyleGAN2 generator, codes relative to the average latent.

The same model holds the ReStyle and e4e families (`arch.family`): e4e runs through `forward` like
pSp; ReStyle's refinement loop (`psp_core.inference.refine`) uses `encode(x, previous=...)`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from psp_core.nets.encoders import ENCODERS
from psp_core.nets.stylegan2 import Generator
from psp_core.options import E4E_OBJECTIVE_FAMILIES, PSPArchitecture

POOLED_SIZE = 256   # `resize=True` pools outputs to the 256x256 the losses and the reference use


class PSP(nn.Module):
    """pixel2style2pixel: image -> encoder -> (+ latent_avg) -> W+ -> frozen or trained generator -> image."""

    def __init__(self, arch: PSPArchitecture = PSPArchitecture()):
        super().__init__()
        self.arch = arch
        self.n_styles = arch.n_styles
        self.encoder = ENCODERS[arch.encoder_type](
            num_layers=arch.encoder_num_layers, mode=arch.encoder_mode, input_nc=arch.input_nc,
            n_styles=self.n_styles, input_size=arch.encoder_input_size)
        self.decoder = Generator(arch.output_size, arch.style_dim, arch.n_mlp, arch.stylegan_channel_multiplier)
        # Not in state_dict: the reference keeps it beside the weights as the checkpoint's `latent_avg`.
        self.register_buffer("latent_avg", None, persistent=False)

    def set_latent_avg(self, latent_avg: torch.Tensor | None) -> None:
        """Store the average latent as [1, 512] (learn_in_w) or [n_styles, 512]; accepts [512],
        [1, 512] or [n_styles, 512] as found in public checkpoints."""
        if latent_avg is None:
            self.latent_avg = None
            return
        rows = 1 if self.arch.learn_in_w else self.n_styles
        latent_avg = latent_avg.detach().float().reshape(-1, self.arch.style_dim)
        if latent_avg.shape[0] == 1:
            latent_avg = latent_avg.repeat(rows, 1)
        elif self.arch.learn_in_w:
            latent_avg = latent_avg[:1]
        if latent_avg.shape[0] != rows:
            raise ValueError(f"latent_avg has {latent_avg.shape[0]} styles, the model has {rows}")
        self.latent_avg = latent_avg.to(self.decoder.input.input.device)

    def encode(self, x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> W+ code [N, n_styles, 512] (or w [N, 512] with learn_in_w), latent_avg added;
        with `previous` (ReStyle's last code [N, n_styles, 512]) the encoder's residual is added to it instead."""
        codes = self.encoder(x)
        if previous is not None:
            return codes + previous.to(codes.dtype)
        if self.arch.start_from_latent_avg:
            if self.latent_avg is None:
                raise RuntimeError("start_from_latent_avg is set but the model has no latent_avg")
            codes = codes + self.latent_avg.to(codes.dtype)
        return codes

    def forward(self, x: torch.Tensor, resize: bool = True, latent_mask: Sequence[int] | None = None,
                input_code: bool = False, randomize_noise: bool = True, inject_latent: torch.Tensor | None = None,
                return_latents: bool = False, alpha: float | None = None, previous: torch.Tensor | None = None):
        """The reference pSp forward: `input_code` treats `x` as codes (fed as z, as the reference
        does); `latent_mask` layers are replaced by (or, with `alpha`, blended toward) `inject_latent`;
        `previous` is ReStyle's last code (see `encode`; the reference's `latent`)."""
        codes = x if input_code else self.encode(x, previous=previous)
        if latent_mask is not None:
            codes = mix_styles(codes, latent_mask, inject_latent, alpha)
        images, latents = self.decoder([codes], input_is_latent=not input_code,
                                       randomize_noise=randomize_noise, return_latents=return_latents)
        if resize:
            images = F.adaptive_avg_pool2d(images, (POOLED_SIZE, POOLED_SIZE))
        return (images, latents) if return_latents else images

    @property
    def opts(self) -> dict[str, Any]:
        """The checkpoint `opts`: our architecture plus the reference keys its loaders read."""
        opts = {**asdict(self.arch), "n_styles": self.n_styles, "checkpoint_path": None, "device": "cuda:0",
                "label_nc": 0 if self.arch.input_nc == 3 or self.arch.family != "psp" else self.arch.input_nc}
        if self.arch.family in E4E_OBJECTIVE_FAMILIES:
            opts["stylegan_size"] = self.arch.output_size   # the e4e reference reads its output size here
        if self.decoder.conv_clamp is not None:
            opts["conv_clamp"] = self.decoder.conv_clamp   # a converted StyleGAN2-ADA generator's clamp
        return opts


def mix_styles(codes: torch.Tensor, layers: Sequence[int], inject: torch.Tensor | None,
               alpha: float | None) -> torch.Tensor:
    """Style mixing on the W+ layers in `layers`: blend toward `inject` by `alpha`, replace by it
    when alpha is None, or zero the layers when there is nothing to inject (reference semantics)."""
    codes = codes.clone()
    for i in layers:
        if inject is None:
            codes[:, i] = 0
        elif alpha is None:
            codes[:, i] = inject[:, i]
        else:
            codes[:, i] = alpha * inject[:, i] + (1 - alpha) * codes[:, i]
    return codes
