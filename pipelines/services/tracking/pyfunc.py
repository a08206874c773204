"""The MLflow pyfunc model of an encoder (pSp, ReStyle, e4e or HyperStyle), logged as "model from code" (this
file), so that loading it runs this code and reads the checkpoint with weights_only=True: nothing is
unpickled. It runs the inference core, as `psp invert` does. A HyperStyle version carries its W encoder as a
second artifact, stored beside the checkpoint under the name the checkpoint's opts give, where `load_psp` finds it.

Input: integer RGB pixels [N, H, W, 3] in 0..255 (what a JSON request carries), or float32 images
[N, C, H, W] in [-1, 1] (C: 3, or the sketch / label-map channels such a model takes); any size (resized to the encoder's input). Output: W+ codes
[N, n_styles, 512] float32; with the param `return_images=True` a dict of `latents` and `images`
(the reconstructions, [N, 3, 256, 256] in [-1, 1]). Param `n_iters`: ReStyle's and HyperStyle's refinement steps
(1..MAX_REFINE_ITERS). HyperStyle's codes are the W encoder's; its weight offsets are not returned (an edit
recomputes them from the image).
"""
from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from psp_core.errors import InputError
from psp_core.inference import DEFAULT_REFINE_ITERS, InferenceModel, image_channels, scored
from psp_core.nets.checkpoints import load_psp

CHECKPOINT_ARTIFACT = "checkpoint"
W_ENCODER_ARTIFACT = "w_encoder"   # HyperStyle's W encoder, beside the checkpoint
PARAMS = {"n_iters": DEFAULT_REFINE_ITERS, "return_images": False}
"""The predict params and their defaults (MLflow's params convention: declared in the signature)."""


PRESET_BY_CHANNELS = {3: "encode", 1: "sketch_to_face", 19: "seg_to_face"}
"""The input transform a version's images get, from the channels its encoder takes."""


def image_batch(array: np.ndarray, channels: int) -> torch.Tensor:
    """The model input as the preset transform takes it: pixels [N, H, W, 3] -> uint8 [N, 3, H, W];
    float [N, C, H, W] in [-1, 1] -> [0, 1]."""
    if array.ndim != 4:
        raise InputError(f"images must be 4-D ([N, H, W, 3] pixels or [N, C, H, W] floats), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.shape[-1] != 3 or channels != 3 or array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise InputError(f"integer images must be RGB pixels [N, H, W, 3] in 0..255, got shape {array.shape}")
        return torch.from_numpy(array.astype(np.uint8)).permute(0, 3, 1, 2)
    if array.shape[1] != channels:
        raise InputError(f"float images must be [N, {channels}, H, W] in [-1, 1], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InputError(f"float images must be finite numbers in [-1, 1] (no NaN or Inf), got dtype {array.dtype}")
    return (torch.from_numpy(array.astype(np.float32)) + 1) / 2


class PSPEncoderModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the encoder from the logged checkpoint (HyperStyle: with the W encoder beside it) and encodes images
    into W+."""

    model: InferenceModel

    def load_context(self, context: Any) -> None:
        net = load_psp(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model = InferenceModel(net, PRESET_BY_CHANNELS.get(image_channels(net), "encode"))

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        params = {**PARAMS, **(params or {})}
        images = image_batch(np.asarray(model_input), image_channels(self.model.net))
        source, _ = self.model.prepare(images, images)
        final = self.model.invert(source, params["n_iters"])[-1]   # checked there: an integer in 1..20, as the CLI's
        latents = final.latents.float().cpu().numpy()
        if not params["return_images"]:
            return latents
        return {"latents": latents, "images": scored(final.images).cpu().numpy()}


if __name__ != "pipelines.services.tracking.pyfunc":   # loaded from this file by MLflow ("model from code")
    mlflow.models.set_model(PSPEncoderModel())
