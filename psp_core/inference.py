"""Running a loaded model on images: ReStyle's iterative refinement (`refine`).

pSp and e4e models run in one pass, through the model's own call:
`net(x, resize=False, randomize_noise=False, return_latents=True)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from psp_core.errors import InputError
from psp_core.options import REFINED_CHANNELS, RESTYLE_FAMILIES
from psp_core.psp import POOLED_SIZE, PSP


def average_image(net: PSP, size: tuple[int, int] = (POOLED_SIZE, POOLED_SIZE)) -> torch.Tensor:
    """The generator's image of `latent_avg` (stored noise) pooled to `size`: [1, 3, *size], ReStyle's
    stand-in for "the last output" at the first iteration."""
    image, _ = net.decoder([net.latent_avg.unsqueeze(0)], input_is_latent=True, randomize_noise=False)
    return F.adaptive_avg_pool2d(image, size)


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
    size = tuple(images.shape[-2:])
    last_output = average_image(net, size).to(images.dtype).expand(images.shape[0], -1, -1, -1)
    latent = None
    results = []
    for _ in range(n_iters):
        latent = net.encode(torch.cat([images, last_output], dim=1), previous=latent)
        image, _ = net.decoder([latent], input_is_latent=True, randomize_noise=randomize_noise)
        last_output = F.adaptive_avg_pool2d(image, size)
        results.append((F.adaptive_avg_pool2d(image, (POOLED_SIZE, POOLED_SIZE)) if resize else image, latent))
    return results
