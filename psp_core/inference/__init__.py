"""The inference core every stage shares: a loaded encoder on its device and precision (`InferenceModel`),
ReStyle's refinement (`refine`), pooling for scores, and style mixing."""
from psp_core.inference.model import (
    DEFAULT_REFINE_ITERS,
    InferenceModel,
    Inversion,
    choose_device,
    default_mix_layers,
    image_channels,
    scored,
    should_compile,
)
from psp_core.inference.refine import average_image, refine, refinement_step

__all__ = ["DEFAULT_REFINE_ITERS", "InferenceModel", "Inversion", "average_image", "choose_device",
           "default_mix_layers", "image_channels", "refine", "refinement_step", "scored", "should_compile"]
