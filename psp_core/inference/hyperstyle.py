"""HyperStyle's iterative inversion (the reference's `run_inversion`): fixed W codes, weight offsets refined over
iterations, each seeing the target beside the last output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from psp_core.errors import InputError
from psp_core.nets.hyperstyle import HyperStyle, WeightOffsets
from psp_core.nets.psp import POOLED_SIZE


@dataclass(frozen=True)
class HyperStyleStep:
    """One iteration: images [N, 3, S, S] (pooled to 256x256 with `resize`), the codes [N, n_styles, 512] (the W
    encoder's, the same every iteration) and the weight offsets accumulated so far (`WeightOffsets`): decoding
    `latents` (or an edit of them) with `offsets` gives this image (`HyperStyle.decode`)."""

    images: Tensor
    latents: Tensor
    offsets: WeightOffsets


def initial_inversion(net: HyperStyle, images: Tensor) -> tuple[Tensor, Tensor]:
    """The W encoder's codes [N, n_styles, 512] and their image without offsets (stored noise), pooled to 256x256:
    what the first iteration's hypernetwork sees beside the target. Returns (image, codes)."""
    codes = net.encode(images)
    return F.adaptive_avg_pool2d(net.decode(codes), (POOLED_SIZE, POOLED_SIZE)), codes


def offsets_of(offsets: WeightOffsets, rows: Tensor) -> WeightOffsets:
    """The offsets of the images `rows` (indices [M] into the batch they were predicted for), in that order: one
    image's offsets repeated for each edit of its code."""
    return [None if o is None else o.index_select(0, rows.to(o.device)) for o in offsets]


def keep_layers(offsets: WeightOffsets, layers: Sequence[int] | None) -> WeightOffsets:
    """Only the offsets of generator `layers` (`Generator.modulated_convs` indices; the others None, the generator's
    own weights there); None keeps every layer. Domain adaptation keeps the layers the new generator shares with the
    one the offsets were predicted for (the reference's toonify run: 14, 15, 17, 18, 20, 21, 23, 24)."""
    if layers is None:
        return list(offsets)
    unknown = sorted(set(layers) - set(range(len(offsets))))
    if unknown:
        raise InputError(f"layer {unknown[0]} is not a layer of this generator (0..{len(offsets) - 1})")
    return [o if i in layers else None for i, o in enumerate(offsets)]


def hyperstyle_steps(net: HyperStyle, images: Tensor, n_iters: int, resize: bool = False,
                     randomize_noise: bool = False) -> list[HyperStyleStep]:
    """HyperStyle inference: codes = W encoder + latent_avg and the initial image (`initial_inversion`), then
    `n_iters` iterations, each adding the hypernetwork's offsets for (target, last output pooled to 256x256) to the
    last ones and decoding the codes with them. `images` [N, 3, E, E] in [-1, 1] (E the network's input size, 256
    for the released ones) -> one `HyperStyleStep` per iteration. Stored noise unless `randomize_noise` (the initial
    image always has it, as in the reference)."""
    if not isinstance(net, HyperStyle):
        raise InputError(f"HyperStyle inference needs a HyperStyle model, this one is {net.arch.family}")
    side = net.arch.encoder_input_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side):
        raise InputError(f"this HyperStyle takes target images [N, 3, {side}, {side}], got {list(images.shape)}")
    if n_iters < 1:
        raise InputError(f"n_iters must be >= 1, got {n_iters}")
    last_output, codes = initial_inversion(net, images)
    offsets: WeightOffsets | None = None
    steps = []
    for _ in range(n_iters):
        last_output, offsets = net(images, last_output, codes, offsets, randomize_noise=randomize_noise)
        shown = F.adaptive_avg_pool2d(last_output, (POOLED_SIZE, POOLED_SIZE)) if resize else last_output
        steps.append(HyperStyleStep(shown, codes, offsets))
    return steps


def refine_hyperstyle(net: HyperStyle, images: Tensor, n_iters: int, resize: bool = False,
                      randomize_noise: bool = False) -> list[tuple[Tensor, Tensor]]:
    """`hyperstyle_steps` as ReStyle's `refine` returns its iterations: one (images, latents) pair per iteration
    (the offsets, for editing, are in `hyperstyle_steps`' results)."""
    return [(step.images, step.latents)
            for step in hyperstyle_steps(net, images, n_iters, resize=resize, randomize_noise=randomize_noise)]
