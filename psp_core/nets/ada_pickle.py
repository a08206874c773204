"""NVIDIA's StyleGAN2-ADA network pickles (`network-snapshot-*.pkl`) read as data, never run as code.

NVIDIA's training loop writes `pickle.dump({'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'})`.
Every network module in it is a persistent object of `torch_utils.persistence`: a call
`_reconstruct_persistent_obj(meta)` whose `meta` holds the source code of the module's Python file (the
ordinary loader executes it), the class name and the module's state (its `__dict__`: `_parameters`,
`_buffers`, `_modules`, the constructor's `_init_args` / `_init_kwargs` and plain attributes). Tensors are
pickled the plain torch way: `_rebuild_tensor_v2(storage, ...)` with each storage a `_load_from_bytes(bytes)`
call, whose bytes are a small legacy `torch.save` file.

`NetworkUnpickler` admits only the globals this format needs, each mapped to a function of ours that builds
data: storages decoded by `torch.load(weights_only=True)`, tensors and parameters as plain tensors,
containers, numpy scalars of plain numbers, and a `PickledModule` record for each persistent
object (its source kept as a string, never executed). Any other global is refused by name before it is
imported, so nothing in the file runs and NVIDIA's code need not be installed.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from psp_core.errors import CheckpointError

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C   # the first value of a legacy (non-zip) torch.save file
TENSORFLOW_NETWORK = ("dnnlib.tflib.network", "Network")
PLAIN_DTYPE = re.compile(r"[biufc][0-9]{1,2}|[?bBhHiIlLqQpPefdgFDG]")   # booleans and numbers, never objects
RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}   # protocol-2 pickles of Python 2 names


class _Sealed(type):
    """The type of the classes the unpickler hands out: a pickle cannot change them (BUILD on a class sets
    attributes), so one file cannot alter how the next one loads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise CheckpointError(f"a pickle that modifies the loader's class {cls.__name__}")


class _Builder:
    """An allowed global as the unpickler hands it out: calls our function; a pickle cannot change it."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]):
        object.__setattr__(self, "function", function)

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointError(f"a pickle that modifies the loader's {self.function.__name__}")

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


class PickledEasyDict(dict, metaclass=_Sealed):
    """`dnnlib.util.EasyDict` (a dict with attribute access) as a plain dict: the data, not NVIDIA's class."""


@dataclass(frozen=True, slots=True)
class PickledModule:
    """One network module of a pickle, as data: NVIDIA's persistent-object record of a `torch.nn.Module`."""

    class_name: str
    module_src: str                          # the source code the ordinary loader would execute: kept as text
    version: int | None
    init_args: tuple
    init_kwargs: dict[str, Any]
    attributes: dict[str, Any]               # the plain attributes: resolution, conv_clamp, weight_gain, ...
    parameters: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor | None]
    modules: dict[str, PickledModule | None]

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer `name`; CheckpointError naming it when the module has none."""
        found = self.parameters.get(name, self.buffers.get(name))
        if not isinstance(found, torch.Tensor):
            raise CheckpointError(f"{self.class_name} has no tensor {name!r}")
        return found

    def child(self, name: str) -> PickledModule:
        """The submodule `name`; CheckpointError naming it when the module has none."""
        found = self.modules.get(name)
        if not isinstance(found, PickledModule):
            raise CheckpointError(f"{self.class_name} has no submodule {name!r} (has {sorted(self.modules)[:6]})")
        return found

    def has(self, name: str) -> bool:
        """Whether the module has a submodule or tensor called `name`."""
        return self.modules.get(name) is not None or name in self.parameters or name in self.buffers


def _persistent_module(meta: Any) -> PickledModule:
    """`torch_utils.persistence._reconstruct_persistent_obj(meta)`, as a record: checks the layout, runs nothing."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError(f"a persistent object of unknown type {type(meta).__name__}")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent object {meta.get('class_name')!r}: state is not a dict")
    class_name, source = meta.get("class_name"), meta.get("module_src")
    if not isinstance(class_name, str) or not isinstance(source, str):
        raise CheckpointError("a persistent object without a class name or module source")
    parameters, buffers, modules = (state.get(key) or {} for key in ("_parameters", "_buffers", "_modules"))
    for what, entries, kinds in (("parameter", parameters, torch.Tensor), ("buffer", buffers, torch.Tensor),
                                 ("submodule", modules, PickledModule)):
        if not isinstance(entries, dict) or not all(v is None or isinstance(v, kinds) for v in entries.values()):
            raise CheckpointError(f"{class_name}: a {what} that is not a {kinds.__name__}")
    init_args, init_kwargs = state.get("_init_args", ()), state.get("_init_kwargs", {})
    return PickledModule(
        class_name=class_name, module_src=source,
        version=meta.get("version") if isinstance(meta.get("version"), int) else None,
        init_args=tuple(init_args) if isinstance(init_args, (tuple, list)) else (),
        init_kwargs=dict(init_kwargs) if isinstance(init_kwargs, dict) else {},
        attributes={k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("_")},
        parameters=dict(parameters), buffers=dict(buffers), modules=dict(modules))


def _storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """`torch.storage._load_from_bytes(b)`: the bytes decoded by `torch.load(weights_only=True)`, which admits
    only tensors and storages (the original calls torch.load with weights_only=False)."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"a storage whose data is a {type(data).__name__}, not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # TypedStorage's deprecation note: the storage only feeds a tensor
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"a storage record that holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2`: a tensor viewing a decoded storage; hooks and metadata refused."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"a tensor over a {type(storage).__name__}, not a storage")
    if hooks or metadata:
        raise CheckpointError("a tensor with backward hooks or metadata: Python objects, not weights")
    if not isinstance(offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
        raise CheckpointError("a tensor with a non-integer size, stride or offset")
    tensor = torch.empty((0,), dtype=storage.dtype)
    try:
        tensor.set_(storage._untyped_storage, offset, tuple(size), tuple(stride))
    except RuntimeError as err:
        raise CheckpointError(f"a tensor outside its storage ({str(err).splitlines()[0]})") from None
    stored = storage._untyped_storage.nbytes() // tensor.element_size()
    if tensor.numel() > max(1, stored):   # a zero-stride view would claim memory the file never held
        raise CheckpointError(f"a tensor of {tensor.numel()} values over a storage of {stored}")
    return tensor


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    """`torch._utils._rebuild_parameter(_with_state)`: the parameter's data as a plain tensor."""
    if not isinstance(data, torch.Tensor) or hooks:
        raise CheckpointError("a parameter that is not a plain tensor")
    return data


class PickledDtype(metaclass=_Sealed):
    """`numpy.dtype(name)` as data: the type code and the byte order its pickled state sets. A stand-in, so a
    pickled dtype state (which can set numpy's internal flags) never reaches numpy."""

    __slots__ = ("name", "byteorder")

    def __init__(self, name: str):
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def numpy(self) -> np.dtype:
        """The numpy dtype it stands for."""
        return np.dtype(self.name).newbyteorder(self.byteorder)


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> PickledDtype:
    """`numpy.dtype(name, ...)` for booleans and numbers only (an object dtype could hold anything)."""
    if not isinstance(name, str) or not PLAIN_DTYPE.fullmatch(name):
        raise CheckpointError(f"refuses to load numpy dtype {name!r}: only plain numbers are weights")
    return PickledDtype(name)


def _numpy_scalar(dtype: Any, data: Any) -> bool | int | float | complex:
    """`numpy.core.multiarray.scalar(dtype, bytes)` (how numpy pickles e.g. NVIDIA's `weight_gain`, an
    np.float64): the number as a Python scalar."""
    if not isinstance(dtype, PickledDtype) or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("a numpy scalar that is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype.numpy(), count=1)[0].item()


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode(text, 'latin1')`: how protocol 2 writes bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("refuses to load _codecs.encode of anything but latin-1 text")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_module,
    ("dnnlib.util", "EasyDict"): PickledEasyDict,
    ("dnnlib", "EasyDict"): PickledEasyDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class NetworkUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals in `ALLOWED` (to our data builders) and refuses every
    other one by name, before anything is imported or called."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module = RENAMED_MODULES.get(module, module)
        if (module, name) == TENSORFLOW_NETWORK:
            raise CheckpointError(f"{self.source}: a TensorFlow network pickle (dnnlib.tflib.network.Network, the "
                                  "original StyleGAN / StyleGAN2 release); only PyTorch StyleGAN2-ADA pickles are "
                                  "read, and this one would need TensorFlow code run to load")
        found = ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(f"{self.source}: refuses to load global {module}.{name} (a network pickle needs "
                                  "only tensors, containers and module records; this would run code)")
        return found if isinstance(found, type) else _Builder(found)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: a pickle with persistent ids (a torch.save file?), not a network pickle")


def is_network_pickle(path: str | Path) -> bool:
    """Whether a file is for `read_network_pickle`: a plain pickle, or any `.pkl`, that is not a `torch.save`
    file (a zip, or a legacy file whose first value is torch's magic number). Read from its first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
        if zipfile.is_zipfile(path) or head.startswith(b"\x80") and _first_value(head) == TORCH_LEGACY_MAGIC:
            return False
    except OSError:
        return False
    return head.startswith(b"\x80") or Path(path).suffix.lower() == ".pkl"


def _first_value(head: bytes) -> Any:
    """The argument of the first opcode after PROTO / FRAME in the first bytes of a pickle (None if none)."""
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.name not in ("PROTO", "FRAME"):
                return arg
    except ValueError:   # the bytes end inside an opcode, or they are not a pickle
        pass
    return None


def read_network_pickle(path: str | Path) -> Any:
    """The object a network pickle holds, built as data by `NetworkUnpickler` (CPU tensors, containers,
    `PickledModule` records); CheckpointError with one line for an unsafe, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            return NetworkUnpickler(handle, str(path)).load()
    except CheckpointError as err:
        message = str(err)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, OverflowError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or not a network pickle ({first})") from None
