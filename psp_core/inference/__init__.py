"""The inference core every stage shares: a loaded encoder on its device and precision (`InferenceModel`),
ReStyle's refinement (`refine`), HyperStyle's (`hyperstyle_steps`, `refine_hyperstyle`), pooling for scores, and
style mixing."""
from psp_core.inference.hyperstyle import (
    HyperStyleStep,
    hyperstyle_steps,
    initial_inversion,
    keep_layers,
    offsets_of,
    refine_hyperstyle,
)
from psp_core.inference.model import (
    DEFAULT_REFINE_ITERS,
    InferenceModel,
    Inversion,
    choose_device,
    compile_networks,
    default_mix_layers,
    image_channels,
    scored,
    should_compile,
)
from psp_core.inference.refine import average_image, refine, refinement_step

__all__ = ["DEFAULT_REFINE_ITERS", "HyperStyleStep", "InferenceModel", "Inversion", "average_image", "choose_device",
           "compile_networks", "default_mix_layers", "hyperstyle_steps", "image_channels", "initial_inversion",
           "keep_layers", "offsets_of", "refine", "refine_hyperstyle", "refinement_step", "scored", "should_compile"]
