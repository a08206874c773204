"""Generators converted from NVIDIA's StyleGAN2-ADA network pickles, once per machine: a `generator` setting
may name a `network-snapshot-*.pkl`; the rosinality-layout file made from it is kept in the weights cache,
keyed by the pickle's sha256 and the network taken from it, and re-verified on every use like fetched weights.
Not exported by the storage package, so the stages that never read a generator never import torch."""
from __future__ import annotations

from pathlib import Path

from pipelines.services.storage.cache import cached_copy
from pipelines.services.storage.files import file_digest
from psp_core.nets.ada_generator import read_ada_generator
from psp_core.nets.ada_pickle import is_network_pickle
from psp_core.nets.checkpoints import save_generator

CONVERTER_VERSION = 1   # bump when the conversion changes: cached files of older versions are made again


def converted_generator(path: str | Path, network: str = "G_ema", cache_dir: Path | None = None) -> Path:
    """A local generator file in the rosinality layout: a StyleGAN2-ADA network pickle's `network` converted
    once per machine into the cache (`cache_dir`, default the user's), any other file as it is."""
    path = Path(path)
    if not is_network_pickle(path):
        return path
    digest = file_digest(path)

    def convert(staging: Path) -> Path:
        converted = read_ada_generator(path, network)
        return save_generator(converted.generator, converted.latent_avg, staging / f"{path.stem}.{network}.pt")

    return cached_copy(f"stylegan2-ada:sha256:{digest}:{network}", {"converter": CONVERTER_VERSION}, convert,
                       cache_dir)
