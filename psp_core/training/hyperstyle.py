"""HyperStyle trained as its reference coach trains it (`training/coach_hyperstyle.py`): the W encoder and the
generator frozen, the hypernetwork refining the W encoder's image over `n_iters_per_batch` passes per batch, each
pass's loss back-propagated, one optimiser step per batch (the engine's `Trainer` runs the loop)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psp_core.inference.hyperstyle import initial_inversion
from psp_core.nets.hyperstyle import HyperStyle
from psp_core.nets.psp import POOLED_SIZE


def prepare_hyperstyle(net: HyperStyle, train_decoder: bool) -> list[nn.Parameter]:
    """Freeze what the reference coach does not train and return the rest: the hypernetwork (its shared
    hypernetwork only when a tuned layer uses it: no gradient reaches it otherwise, and DDP would wait for one) and,
    with `train_decoder`, the generator's synthesis network. The W encoder stays frozen."""
    net.requires_grad_(False)
    net.hypernet.requires_grad_(True)
    if not set(net.arch.layers_to_tune) & set(net.hypernet.shared_layers):
        net.hypernet.shared_weight_hypernet.requires_grad_(False)
    if train_decoder:
        net.decoder.requires_grad_(True)
        net.decoder.style.requires_grad_(False)
    return [p for p in net.parameters() if p.requires_grad]


def hyperstyle_passes(model: nn.Module, net: HyperStyle, target: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """HyperStyle's passes on one batch of targets [N, 3, E, E] (E its input size), as the reference coach runs them:
    the W encoder's codes and their image (no gradient), then per pass the hypernetwork's offsets for (target, last
    output) added to the last ones and the codes decoded with them (stored noise); offsets and image are detached
    between passes, so a pass's loss reaches the hypernetwork through its own call only. `model` is `net` or its
    wrapper (DDP, compiled). Yields (output pooled to 256 [N, 3, 256, 256], codes [N, n_styles, 512]) for as many
    passes as the caller takes, computing and back-propagating each pass's loss before it asks for the next."""
    with torch.no_grad():
        last_output, codes = initial_inversion(net, target)
    offsets = None
    while True:
        image, offsets = model(target, last_output, codes, offsets)
        output = F.adaptive_avg_pool2d(image, (POOLED_SIZE, POOLED_SIZE))
        yield output, codes
        last_output = output.detach()
        offsets = [None if o is None else o.detach() for o in offsets]
