"""psp_core: the pSp (pixel2style2pixel) library in pure PyTorch: StyleGAN2 generator, IR-SE
encoders, the pSp model and the public checkpoint formats. No Ray, MLflow or DVC in here."""
from psp_core.checkpoints import (
    CheckpointError,
    build_psp,
    load_generator,
    load_irse50,
    load_psp,
    read_generator_checkpoint,
    save_psp,
)
from psp_core.irse import IRSEBackbone
from psp_core.psp import PSP, PSPArchitecture, n_styles_for
from psp_core.stylegan2 import Generator

__all__ = [
    "CheckpointError", "Generator", "IRSEBackbone", "PSP", "PSPArchitecture", "build_psp", "load_generator",
    "load_irse50", "load_psp", "n_styles_for", "read_generator_checkpoint", "save_psp",
]
