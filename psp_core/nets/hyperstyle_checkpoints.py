"""Reading HyperStyle's released files strictly.

- HyperStyle: `{'state_dict': hypernet.* + decoder.*, 'opts': dict, 'latent_avg': [512] or [n_styles, 512]}`; the
  shared hypernetwork's tensors (`hypernet.shared_weight_hypernet.*`) are repeated under the head of every tuned
  shared layer (`hypernet.refinement_blocks.N.hypernet.*`): one tensor in our model, each copy checked equal.
- Its W encoder (`faces_w_encoder.pt`, `opts.w_encoder_checkpoint_path`): `encoder.*` is read (a `decoder.*` beside
  it is ignored), sized by the HyperStyle opts; found beside the checkpoint, else in `pretrained_models/`.

A HyperStyle model this project trains is written in the same layout (`save_hyperstyle`), its W encoder named by
file: the registered version keeps that file beside the checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from psp_core.errors import CheckpointError
from psp_core.nets.checkpoint_io import (
    assign_strict,
    atomic_torch_save,
    conv_clamp_entry,
    load_strict,
    read_checkpoint,
    require_entry,
    sub_state,
)
from psp_core.nets.hyperstyle import HyperStyle
from psp_core.nets.stylegan2 import generator_architecture
from psp_core.options import HYPERSTYLE_W_ENCODER, HyperStyleArchitecture

PRETRAINED_FOLDER = Path("pretrained_models")
"""Where the reference keeps its auxiliary weights, relative to the working directory."""
SHARED_PREFIX = "shared_weight_hypernet."
ALIAS = re.compile(r"(refinement_blocks\.\d+\.hypernet\.)(.+)")


def load_hyperstyle(path: str | Path, state: Mapping[str, torch.Tensor], opts: Any, latent_avg: torch.Tensor | None,
                    w_encoder: str | Path | None = None) -> HyperStyle:
    """A HyperStyle checkpoint's contents (read by `load_psp`) and its W encoder file (`w_encoder`, else found by
    `find_w_encoder`) -> the model on the CPU, in eval mode. Everything is checked on shapes before weights are
    placed; the model's tensors are the files' own (no copy)."""
    try:
        arch = HyperStyleArchitecture.from_opts(opts)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable 'opts': {err}") from None
    if latent_avg is None:
        raise CheckpointError(f"{path}: a HyperStyle model starts from latent_avg, but the file has no 'latent_avg'")
    w_path = find_w_encoder(path, opts, w_encoder)
    extra = [k for k in state if not k.startswith(("hypernet.", "decoder."))]
    if extra:
        raise CheckpointError(f"{path}: state_dict has keys outside hypernet/decoder: {extra[:3]}")
    with torch.device("meta"):   # shapes only: the file's tensors become the parameters once they fit
        net = HyperStyle(arch)
    hypernet = without_shared_copies(sub_state(state, "hypernet"), net.hypernet.shared_alias_prefixes(), path)
    decoder = sub_state(state, "decoder")
    found = generator_architecture(decoder)["channel_multiplier"]
    if "convs.6.conv.weight" in decoder and found != arch.stylegan_channel_multiplier:
        raise CheckpointError(f"{path}: the file's generator has channel multiplier {found} (its 64 px layers' width), "
                              f"the opts' stylegan_channel_multiplier (2 when absent) is "
                              f"{arch.stylegan_channel_multiplier}")
    assign_strict(net.hypernet, hypernet, f"{path} hypernet")
    assign_strict(net.decoder, decoder, f"{path} decoder")
    net.decoder.set_conv_clamp(conv_clamp_entry(opts, path))
    assign_strict(net.w_encoder, read_w_encoder(w_path), f"{w_path} encoder (HyperStyle's W encoder)")
    try:
        net.set_latent_avg(latent_avg)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    net.w_encoder_file = w_path.name
    return net.eval()


def without_shared_copies(state: Mapping[str, torch.Tensor], alias_prefixes: list[str],
                          path: str | Path) -> dict[str, torch.Tensor]:
    """The hypernetwork's state with the shared hypernetwork's copies under `alias_prefixes` removed, each checked
    to be the tensor of `shared_weight_hypernet.<name>` (a copy anywhere else stays, and the strict check names it)."""
    kept = {}
    for key, tensor in state.items():
        match = ALIAS.fullmatch(key)
        if match is None or match.group(1) not in alias_prefixes or SHARED_PREFIX + match.group(2) not in state:
            kept[key] = tensor
        elif not same_values(tensor, state[SHARED_PREFIX + match.group(2)]):
            raise CheckpointError(f"{path}: hypernet.{key} differs from hypernet.{SHARED_PREFIX}{match.group(2)}: "
                                  "the shared hypernetwork is one tensor, repeated under every head that uses it")
    return kept


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (at once when they view the same memory, as torch.save keeps them)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return torch.equal(a, b)


def find_w_encoder(path: str | Path, opts: Mapping[str, Any], w_encoder: str | Path | None) -> Path:
    """The W encoder file: `w_encoder` when given, else the file named by `opts.w_encoder_checkpoint_path` (its name
    only: the path is the training machine's) beside the checkpoint, then in `pretrained_models/`."""
    if w_encoder is not None:
        if not Path(w_encoder).is_file():
            raise CheckpointError(f"{w_encoder}: HyperStyle's W encoder file not found")
        return Path(w_encoder)
    name = w_encoder_name(opts)
    beside = Path(path).parent / name
    for candidate in (beside, PRETRAINED_FOLDER / name):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: HyperStyle needs its W encoder {name} (opts' w_encoder_checkpoint_path), found "
                          f"neither beside the checkpoint ({beside}) nor in {PRETRAINED_FOLDER}/: put it in either "
                          "place, or give its path")


def w_encoder_name(opts: Mapping[str, Any]) -> str:
    """The file name of a HyperStyle checkpoint's W encoder: that of `opts.w_encoder_checkpoint_path` (its folder is
    the training machine's), else the reference's `faces_w_encoder.pt`; a registered version keeps it under this
    name beside the checkpoint."""
    return re.split(r"[\\/]", str(opts.get("w_encoder_checkpoint_path") or ""))[-1] or HYPERSTYLE_W_ENCODER


def read_w_encoder(path: Path) -> dict[str, torch.Tensor]:
    """The `encoder.*` weights of a W encoder checkpoint (`{'state_dict': encoder.* [+ decoder.*], ...}`)."""
    state = require_entry(read_checkpoint(path), "state_dict", path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
    extra = [k for k in state if not k.startswith(("encoder.", "decoder."))]
    if extra:
        raise CheckpointError(f"{path}: state_dict has keys outside encoder/decoder: {extra[:3]}")
    return sub_state(state, "encoder")


def hyperstyle_opts(net: HyperStyle) -> dict[str, Any]:
    """The reference opts that fix a HyperStyle network, its W encoder named by its file (`w_encoder_file`), and a
    converted StyleGAN2-ADA generator's clamp (`conv_clamp`, not a tensor; an opt the reference ignores, as it ignores
    `encoder_input_size`: 256 in every released file)."""
    arch, w_encoder = net.arch, net.w_encoder_file
    return {"encoder_type": arch.encoder_type, "input_nc": arch.input_nc, "output_size": arch.output_size,
            "layers_to_tune": ",".join(map(str, arch.layers_to_tune)), "n_hypernet_outputs": arch.n_hypernet_outputs,
            "w_encoder_checkpoint_path": w_encoder, "w_encoder_type": "WEncoder", "load_w_encoder": True,
            "stylegan_channel_multiplier": arch.stylegan_channel_multiplier,
            "encoder_input_size": arch.encoder_input_size,
            **({} if net.decoder.conv_clamp is None else {"conv_clamp": net.decoder.conv_clamp})}


def save_hyperstyle(net: HyperStyle, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `net` in the released layout `load_psp` (and the reference) reads, atomically: `hypernet.*` with the
    shared hypernetwork's tensors repeated under every head that uses it (as the reference's modules register them),
    `decoder.*`, opts naming the W encoder's file (`w_encoder_file`; not in this file: it is its own),
    `latent_avg`; plus `extra` entries (e.g. training state)."""
    hyper = {k: v.detach().cpu() for k, v in net.hypernet.state_dict().items()}
    for prefix in net.hypernet.shared_alias_prefixes():
        for name in net.hypernet.shared_weight_hypernet.state_dict():
            hyper[prefix + name] = hyper[SHARED_PREFIX + name]
    state = {**{f"hypernet.{k}": v for k, v in hyper.items()},
             **{f"decoder.{k}": v.detach().cpu() for k, v in net.decoder.state_dict().items()}}
    ckpt = {"state_dict": state, "opts": hyperstyle_opts(net), "latent_avg": net.latent_avg.detach().cpu(),
            **dict(extra or {})}
    return atomic_torch_save(ckpt, path)


def load_hyperstyle_weights(net: HyperStyle, ckpt: Mapping[str, Any], path: str | Path) -> None:
    """A checkpoint `save_hyperstyle` wrote (read from `path`) into `net` of the same architecture, strictly: the
    hypernetwork, the generator and latent_avg (the W encoder is not in the file and stays): resuming training."""
    state = require_entry(ckpt, "state_dict", path)
    hypernet = without_shared_copies(sub_state(state, "hypernet"), net.hypernet.shared_alias_prefixes(), path)
    load_strict(net.hypernet, hypernet, f"{path} hypernet")
    load_strict(net.decoder, sub_state(state, "decoder"), f"{path} decoder")
    net.set_latent_avg(require_entry(ckpt, "latent_avg", path))
