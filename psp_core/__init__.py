"""psp_core: the pSp (pixel2style2pixel) library in pure PyTorch: StyleGAN2 generator, IR-SE
encoders, the pSp model (and its ReStyle and e4e families), ReStyle's refinement and the public
checkpoint formats. No Ray, MLflow or DVC in here.

Names are imported on first use, so `psp_core.align` or `psp_core.shards` alone never pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "psp_core.checkpoints",
    "build_psp": "psp_core.checkpoints",
    "load_generator": "psp_core.checkpoints",
    "load_irse50": "psp_core.checkpoints",
    "load_psp": "psp_core.checkpoints",
    "read_generator_checkpoint": "psp_core.checkpoints",
    "save_psp": "psp_core.checkpoints",
    "IRSEBackbone": "psp_core.irse",
    "refine": "psp_core.inference",
    "PSP": "psp_core.psp",
    "PSPArchitecture": "psp_core.options",
    "n_styles_for": "psp_core.options",
    "InputError": "psp_core.errors",
    "Generator": "psp_core.stylegan2",
    "LossWeights": "psp_core.losses",
    "PSPLoss": "psp_core.losses",
    "Ranger": "psp_core.optim",
    "build_optimizer": "psp_core.optim",
    "PRESETS": "psp_core.presets",
    "PresetTransform": "psp_core.presets",
    "TaskPreset": "psp_core.presets",
    "get_preset": "psp_core.presets",
    "StdoutCallback": "psp_core.engine",
    "Trainer": "psp_core.engine",
    "TrainingCallback": "psp_core.engine",
    "TrainingConfig": "psp_core.options",
    "prepare_for_training": "psp_core.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'psp_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
