"""ReStyle's iterative refinement: the one step training and inference share, and the loop over it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psp_core.errors import InputError
from psp_core.nets.psp import POOLED_SIZE, PSP
from psp_core.options import REFINED_CHANNELS, RESTYLE_FAMILIES


def average_image(net: PSP, size: tuple[int, int] = (POOLED_SIZE, POOLED_SIZE)) -> torch.Tensor:
    """The generator's image of `latent_avg` (stored noise) pooled to `size`: [1, 3, *size], ReStyle's
    stand-in for "the last output" at the first iteration."""
    image, _ = net.decoder([net.latent_avg.unsqueeze(0)], input_is_latent=True, randomize_noise=False)
    return F.adaptive_avg_pool2d(image, size)


def refinement_step(net: nn.Module, images: Tensor, last_output: Tensor, previous: Tensor | None,
                    randomize_noise: bool = False) -> tuple[Tensor, Tensor]:
    """One ReStyle iteration, the one training and inference share: encode the target `images` [N, C, H, W]
    beside `last_output` ([1 or N, 3, h, w], pooled here to H x W), add the encoder's residual to `previous`
    (the last code [N, n_styles, 512]; latent_avg when None) and decode. Returns (image [N, 3, S, S] at the
    generator's size S, latent [N, n_styles, 512]). `net` is a PSP or a DDP wrapper of one (called through it)."""
    guide = F.adaptive_avg_pool2d(last_output, images.shape[-2:]).to(images.dtype)
    guide = guide.expand(images.shape[0], -1, -1, -1)
    return net(torch.cat([images, guide], dim=1), previous=previous, resize=False,
               randomize_noise=randomize_noise, return_latents=True)


def refine(net: PSP, images: torch.Tensor, n_iters: int, resize: bool = False,
           randomize_noise: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ReStyle inference: `n_iters` passes, each encoding the target together with the last output
    pooled to the target's size (the average image at first; 256x256 in the reference) and adding the
    encoder's residual to the last code (latent_avg at first). `images` [N, 3, H, W] in [-1, 1] -> one
    (images, latents) pair per iteration: images [N, 3, S, S] at the generator's size S (pooled to
    256x256 with `resize`), latents [N, n_styles, 512]. Stored noise unless `randomize_noise`."""
    if net.arch.family not in RESTYLE_FAMILIES:
        raise InputError(f"refine needs a ReStyle model ({', '.join(RESTYLE_FAMILIES)}), this one is {net.arch.family}")
    if images.ndim != 4 or images.shape[1] + REFINED_CHANNELS != net.arch.input_nc:
        raise InputError(f"the encoder sees {net.arch.input_nc} channels: target images must be "
                         f"[N, {net.arch.input_nc - REFINED_CHANNELS}, H, W], got {list(images.shape)}")
    if n_iters < 1:
        raise InputError(f"n_iters must be >= 1, got {n_iters}")
    image, latent = average_image(net, tuple(images.shape[-2:])), None
    results = []
    for _ in range(n_iters):
        image, latent = refinement_step(net, images, image, latent, randomize_noise)
        results.append((F.adaptive_avg_pool2d(image, (POOLED_SIZE, POOLED_SIZE)) if resize else image, latent))
    return results
