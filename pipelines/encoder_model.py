"""The MLflow pyfunc model of a pSp encoder, logged as "model from code" (this file), so that
loading it runs this code and reads the checkpoint with weights_only=True: nothing is unpickled.

Input: images [N, C, H, W] float32 in [-1, 1]; output: W+ codes [N, n_styles, 512] float32.
"""
from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from psp_core import PSP, load_psp

CHECKPOINT_ARTIFACT = "checkpoint"


class PSPEncoderModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the pSp network from the logged checkpoint and encodes images into W+."""

    net: PSP

    def load_context(self, context: Any) -> None:
        self.net = load_psp(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.net.encode(images).numpy()


mlflow.models.set_model(PSPEncoderModel())
