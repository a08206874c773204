"""The parity fixtures' weight rule: every tensor of a state dict filled from its key alone."""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_DTYPES = {"float32": torch.float32, "int64": torch.int64}
DEVICE = torch.device(os.environ.get("PSP_TEST_DEVICE", "cpu"))
"""Where the parity tests run the networks (PSP_TEST_DEVICE=cuda: on the GPU)."""


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only (a module-level switch would leak into every other test module). A parity module imports
    this and `reference_form_only`: autouse fixtures, active in that module alone."""
    from psp_core.runtime.devices import use_ieee_fp32

    if DEVICE.type == "cuda":
        use_ieee_fp32()
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def reference_form_only(monkeypatch):
    """Parity is the reference's operation order: a modulated convolution that takes the fused form fails the test
    (`ModulatedConv2d.exact`, the default for a loaded or built network; the trainer turns it off)."""
    from psp_core.nets.stylegan2 import ModulatedConv2d

    def refuse(self, x, style):
        raise AssertionError("a parity path ran the fused modulated convolution")
    monkeypatch.setattr(ModulatedConv2d, "fused", refuse)


def on_device(array: np.ndarray) -> torch.Tensor:
    """A fixture array as a tensor on the test device."""
    return torch.from_numpy(array).to(DEVICE)


def fixture(name: str) -> dict[str, np.ndarray]:
    """A fixture's arrays (`<name>.npz`)."""
    return dict(np.load(FIXTURES / f"{name}.npz"))


def parity_errors(pairs: list[tuple[str, torch.Tensor, np.ndarray]]) -> list[str]:
    """The arrays of `(name, ours, ref)` outside the fixtures' tolerance, max|ours - ref| <= 1e-4 * max(1, max|ref|),
    each with its error (all of them, so a failure shows where a chain of iterations starts to drift)."""
    failures = []
    for name, ours, ref in pairs:
        ours = ours.detach().float().cpu().numpy()
        if ours.shape != ref.shape:
            failures.append(f"{name}: shape {ours.shape} != {ref.shape}")
            continue
        err, tol = float(np.abs(ours - ref).max()), 1e-4 * max(1.0, float(np.abs(ref).max()))
        if not err <= tol:
            failures.append(f"{name}: max abs error {err:.3g} > tolerance {tol:.3g}")
    return failures


def rule_tensor(key: str, shape: list[int], dtype: str = "float32") -> torch.Tensor:
    """The tensor the parity rule assigns to `key` (seeded by crc32 of the key)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=_DTYPES[dtype])
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    t = torch.randn(shape, generator=g)
    if re.search(r"(^|\.)style\.\d+\.weight$", key):
        return t * 100.0
    if t.ndim < 2 and key.endswith("weight"):
        return 1.0 + 0.1 * t
    if key.endswith("bias") or t.ndim < 2:
        return 0.1 * t
    if t.ndim == 5 or key.endswith("modulation.weight") or ".noises." in key or key.endswith("input.input"):
        return t
    return t / math.sqrt(t.numel() / shape[0])


def fixture_keys(name: str) -> list[tuple[str, list[int], str]]:
    """`[name, shape, dtype]` of a fixture's checkpoint, in the checkpoint's order."""
    return [tuple(k) for k in json.loads((FIXTURES / f"{name}.json").read_text())["keys"]]


def fixture_meta(name: str) -> dict:
    """A fixture's `.json` beside its keys: `config` (the reference opts), `post_scale`, ..."""
    return {k: v for k, v in json.loads((FIXTURES / f"{name}.json").read_text()).items() if k != "keys"}


def rule_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The full state dict of fixture `name` (e.g. 'ref_gradual64') built by the rule, then the
    fixture's `post_scale` (keys matching its pattern multiplied by its factor), if it has one."""
    state = {key: rule_tensor(key, shape, dtype) for key, shape, dtype in fixture_keys(name)}
    post_scale = fixture_meta(name).get("post_scale")
    if post_scale:
        for key in state:
            if re.search(post_scale["pattern"], key):
                state[key] = state[key] * post_scale["factor"]
    return state


GRADUAL64_OPTS = {"encoder_type": "GradualStyleEncoder", "input_nc": 3, "output_size": 64,
                  "start_from_latent_avg": True, "learn_in_w": False}


def write_released_psp(path: Path) -> Path:
    """The `ref_gradual64` pSp network saved in the released checkpoint layout
    (`{'state_dict', 'opts', 'latent_avg' [512]}`), weights by the rule."""
    latent_avg = torch.from_numpy(np.load(FIXTURES / "ref_gradual64.npz")["latent_avg"])
    torch.save({"state_dict": rule_state_dict("ref_gradual64"), "opts": dict(GRADUAL64_OPTS),
                "latent_avg": latent_avg}, path)
    return path


def write_released_family(name: str, path: Path, **extra) -> Path:
    """A ReStyle / e4e fixture network (`ref_restyle_psp64`, `ref_restyle_e4e64`, `ref_e4e64`) saved in its
    released layout: `{'state_dict', 'opts': the reference opts, 'latent_avg' [n_styles, 512]}` plus `extra`
    entries (training state such as `optimizer` or e4e's `discriminator_state_dict`)."""
    latent_avg = torch.from_numpy(np.load(FIXTURES / f"{name}.npz")["latent_avg"])
    torch.save({"state_dict": rule_state_dict(name), "opts": dict(fixture_meta(name)["config"]),
                "latent_avg": latent_avg, **extra}, path)
    return path


def rule_discriminator_state(name: str = "ref_e4e_train64") -> dict[str, torch.Tensor]:
    """The latent discriminator of an e4e training fixture, by the rule on `discriminator.` + each key."""
    meta = fixture_meta(name)["discriminator"]
    return {key: rule_tensor(meta["fill_prefix"] + key, shape, dtype) for key, shape, dtype in meta["keys"]}


def e4e_training_state() -> dict:
    """Entries e4e's coach saves beside the model: the latent discriminator (keys and shapes of
    `LatentCodesDiscriminator(512, 4)`), optimiser states, step and best loss."""
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    return {"discriminator_state_dict": rule_discriminator_state(), "discriminator_optimizer_state_dict": optimizer,
            "optimizer": optimizer, "global_step": 3, "best_val_loss": 0.5}


HYPERSTYLE = "ref_hyperstyle256"
SHARED_HYPERNET = "hypernet.shared_weight_hypernet."


def rule_hyperstyle_state(name: str = HYPERSTYLE) -> dict[str, torch.Tensor]:
    """The HyperStyle fixture's state dict in the file's order: the rule on every canonical key, then its `post_scale`
    and `hyper_scale`; each alias of the shared hypernetwork (`shared_aliases`) holds the canonical tensor itself,
    as torch.save writes the one module registered under several names."""
    meta = fixture_meta(name)
    alias = re.compile(meta["shared_aliases"])
    scales = {meta["post_scale"]["pattern"]: meta["post_scale"]["factor"], **meta["hyper_scale"]}
    state: dict[str, torch.Tensor | None] = {}
    for key, shape, dtype in fixture_keys(name):
        if alias.search(key):
            state[key] = None   # filled below, keeping the file's order
            continue
        tensor = rule_tensor(key, shape, dtype)
        for pattern, factor in scales.items():
            if re.search(pattern, key):
                tensor = tensor * factor
        state[key] = tensor
    return {key: tensor if tensor is not None else state[SHARED_HYPERNET + key.rsplit(".", 1)[1]]
            for key, tensor in state.items()}


def rule_w_encoder_state(name: str = HYPERSTYLE) -> dict[str, torch.Tensor]:
    """The HyperStyle fixture's W encoder file state dict (`encoder.*`, `decoder.*`) by the rule."""
    return {key: rule_tensor(key, shape, dtype) for key, shape, dtype in fixture_meta(name)["w_encoder"]["keys"]}


def write_released_hyperstyle(path: Path, w_encoder_path: Path | None = None, **opts) -> Path:
    """The HyperStyle fixture saved in its released layout (`{'state_dict', 'opts', 'latent_avg' [14, 512]}`), its
    opts naming the W encoder as training left them (`pretrained_models/faces_w_encoder.pt`) plus `opts`; with
    `w_encoder_path`, the W encoder file (`{'state_dict': encoder.* + decoder.*, 'opts', 'latent_avg'}`) too."""
    latent_avg = torch.from_numpy(np.load(FIXTURES / f"{HYPERSTYLE}.npz")["latent_avg"])
    meta = fixture_meta(HYPERSTYLE)
    config = {**meta["config"], "w_encoder_checkpoint_path": "pretrained_models/faces_w_encoder.pt", **opts}
    torch.save({"state_dict": rule_hyperstyle_state(), "opts": config, "latent_avg": latent_avg}, path)
    if w_encoder_path is not None:
        torch.save({"state_dict": rule_w_encoder_state(), "opts": dict(meta["w_encoder"]["config"]),
                    "latent_avg": latent_avg}, w_encoder_path)
    return path
