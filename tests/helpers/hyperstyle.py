"""A small HyperStyle checkpoint and its W encoder, in the released layouts, for the pipeline tests. A HyperStyle
network is never small in weights (the 512x512 shared hypernetwork, the W encoder's IR-SE50); this one is small in
work: a 64 px generator of channel multiplier 1 (StyleGAN2-ADA's channel_base 16384) and a 64 px hypernetwork and W
encoder input (the released networks: 256 px input, config-f generators of 256-1024 px). A training step of it takes
about 2.6x less time than one at 256 px (fp32, batch 2, 2 passes). Build it once per test module."""
from __future__ import annotations

from pathlib import Path

import torch

from psp_core import HyperStyle, HyperStyleArchitecture

LAYERS_TO_TUNE = "0,1"   # the cheapest pair: a layer of the shared hypernetwork (0), one with its own head (1)
W_ENCODER_NAME = "faces_w_encoder.pt"
SIZE = 64   # the generator's output and the hypernetwork's input


def write_hyperstyle(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A HyperStyle network (`SIZE` px generator of multiplier 1 and input, random weights from `seed`) saved as the
    released files: the checkpoint `hyperstyle.pt` (`hypernet.*` with the shared hypernetwork repeated under its head,
    `decoder.*`, opts naming the W encoder by a training machine's path, and the input size, which released opts
    leave out) and beside it the W encoder file under that name. Returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = HyperStyle(HyperStyleArchitecture(output_size=SIZE, encoder_input_size=SIZE, layers_to_tune=LAYERS_TO_TUNE,
                                            stylegan_channel_multiplier=1))
    state = net.state_dict()
    latent_avg = net.decoder.mean_latent(256)[0]
    hyper = {k: v for k, v in state.items() if k.startswith(("hypernet.", "decoder."))}
    for name in ("w1", "b1", "w2", "b2"):   # the reference registers the shared module under each shared head too
        hyper[f"hypernet.refinement_blocks.0.hypernet.{name}"] = hyper[f"hypernet.shared_weight_hypernet.{name}"]
    opts = {"encoder_type": "SharedWeightsHyperNetResNet", "input_nc": 6, "output_size": SIZE,
            "encoder_input_size": SIZE, "layers_to_tune": LAYERS_TO_TUNE, "w_encoder_checkpoint_path": f"/train/pretrained_models/{W_ENCODER_NAME}",
            "stylegan_channel_multiplier": 1}
    checkpoint, w_encoder = folder / "hyperstyle.pt", folder / W_ENCODER_NAME
    torch.save({"state_dict": hyper, "opts": opts, "latent_avg": latent_avg}, checkpoint)
    torch.save({"state_dict": {"encoder." + k[len("w_encoder."):]: v for k, v in state.items()
                               if k.startswith("w_encoder.")},
                "opts": {"encoder_type": "WEncoder", "input_nc": 3, "output_size": SIZE, "n_styles": net.n_styles},
                "latent_avg": latent_avg}, w_encoder)
    return checkpoint, w_encoder
