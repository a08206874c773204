"""Reading and writing checkpoint files safely: `torch.load` with `weights_only=True` and one-line errors, strict
state-dict checks that name the offending keys, atomic saves. The formats themselves: `psp_core.nets.checkpoints`."""
from __future__ import annotations

import os
import pickle
import pickletools
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from psp_core.errors import CheckpointError


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with one-line errors for the usual failures."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the verdict below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        imported = pickled_imports(path)
        if imported:
            raise CheckpointError(f"{path}: refused (weights_only=True): it would import {imported[0]} when loaded: "
                                  "Python objects, possibly code, not only tensors") from None
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint (corrupt data or another format)") from None
    except Exception as err:  # torch.load surfaces a corrupt file as many exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({first})") from None


SAFE_PICKLE_MODULES = ("torch", "collections", "_codecs")


def pickled_imports(path: Path) -> list[str]:
    """The `module.name` globals outside torch and plain containers that a (torch zip or raw)
    pickle would import, read from its opcodes without running them; [] for data that is not a pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        strings: list[str] = []
        found = []
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # not a pickle at all (random bytes, a truncated archive): nothing it would import
        return []
    return [name for name in found if name.split(".")[0] not in SAFE_PICKLE_MODULES]


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one CheckpointError naming the first missing, unexpected and mis-shaped keys, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{what} does not match the architecture: " + "; ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load every tensor of `state` into `module`, all keys and shapes matching."""
    check_state_dict(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


def assign_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Make `state`'s tensors the parameters and buffers of `module`, built on the meta device, all keys and shapes
    matching, each in the module's dtype. Nothing is initialised only to be overwritten (the random initialisation of
    a 1024 px pSp's 280 M parameters), and the file's tensors are not copied."""
    expected = module.state_dict()
    check_state_dict(expected, state, what)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    assert not any(t.is_meta for t in (*module.parameters(), *module.buffers())), f"{what}: a tensor left unloaded"


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (e.g. `encoder.` of a pSp state dict)."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def require_entry(ckpt: Any, key: str, path: str | Path) -> Any:
    """`ckpt[key]`, or one CheckpointError saying the file is not the kind of checkpoint expected."""
    if not isinstance(ckpt, dict) or key not in ckpt:
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: no {key!r} entry (found {keys}); is this the right kind of checkpoint?")
    return ckpt[key]


def conv_clamp_entry(ckpt: Mapping[str, Any], path: str | Path) -> float | None:
    """The `conv_clamp` entry of a generator file or of a model's opts (a converted StyleGAN2-ADA generator's clamp,
    which is not a tensor), None if absent; anything but a positive number is one CheckpointError."""
    clamp = ckpt.get("conv_clamp")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0):
        raise CheckpointError(f"{path}: 'conv_clamp' must be a positive number, got {clamp!r}")
    return None if clamp is None else float(clamp)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
