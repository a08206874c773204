"""psp_core: the pSp (pixel2style2pixel) library in pure PyTorch: StyleGAN2 generator, IR-SE
encoders, the pSp model (and its ReStyle, e4e and W encoder families), HyperStyle, ReStyle's and HyperStyle's
refinement and the public checkpoint formats. No Ray, MLflow or DVC in here.

Names are imported on first use, so `psp_core.data.align` or `psp_core.data.shards` alone never pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "psp_core.nets.checkpoints",
    "build_hyperstyle": "psp_core.nets.checkpoints",
    "build_psp": "psp_core.nets.checkpoints",
    "load_generator": "psp_core.nets.checkpoints",
    "load_irse50": "psp_core.nets.checkpoints",
    "load_psp": "psp_core.nets.checkpoints",
    "read_generator_checkpoint": "psp_core.nets.checkpoints",
    "save_psp": "psp_core.nets.checkpoints",
    "save_hyperstyle": "psp_core.nets.hyperstyle_checkpoints",
    "IRSEBackbone": "psp_core.nets.irse",
    "LatentDiscriminator": "psp_core.nets.discriminator",
    "E4EObjective": "psp_core.training.e4e",
    "discriminator_terms": "psp_core.training.e4e",
    "e4e_encoder_terms": "psp_core.training.e4e",
    "r1_penalty": "psp_core.training.e4e",
    "refine": "psp_core.inference",
    "hyperstyle_steps": "psp_core.inference",
    "refine_hyperstyle": "psp_core.inference",
    "HyperStyle": "psp_core.nets.hyperstyle",
    "HyperStyleArchitecture": "psp_core.options",
    "PSP": "psp_core.nets.psp",
    "PSPArchitecture": "psp_core.options",
    "n_styles_for": "psp_core.options",
    "InputError": "psp_core.errors",
    "Generator": "psp_core.nets.stylegan2",
    "LossWeights": "psp_core.options",
    "PSPLoss": "psp_core.training.losses",
    "Ranger": "psp_core.training.optim",
    "build_optimizer": "psp_core.training.optim",
    "PRESETS": "psp_core.data.presets",
    "PresetTransform": "psp_core.data.presets",
    "TaskPreset": "psp_core.data.presets",
    "get_preset": "psp_core.data.presets",
    "Trainer": "psp_core.training.engine",
    "TrainingCallback": "psp_core.training.callbacks",
    "TrainingConfig": "psp_core.options",
    "prepare_for_training": "psp_core.training.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'psp_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
