"""`psp import-generator`: convert NVIDIA's StyleGAN2-ADA network pickle (`network-snapshot-*.pkl`: AFHQ,
MetFaces, FFHQ 256/512/1024, community models) into the `{'g_ema', 'latent_avg'}` generator file the rest of
the pipeline reads, without running any code from the pickle; a sidecar JSON records where it came from."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.services.storage import write_json_atomic
from pipelines.services.storage.files import file_digest
from pipelines.services.tracking import fetch_weights
from psp_core.errors import InputError
from psp_core.nets.ada_generator import NETWORKS, read_ada_generator
from psp_core.nets.checkpoints import save_generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pickle", metavar="NETWORK_PKL",
                        help="StyleGAN2-ADA network pickle, read as data: nothing in it is imported or run (a local "
                             "path, or an object-store URI fetched once into the weights cache)")
    parser.add_argument("output", type=Path, metavar="OUT_PT",
                        help="generator file to write ({'g_ema', 'latent_avg'}), with OUT_PT.json beside it")
    parser.add_argument("--network", choices=NETWORKS, default="G_ema",
                        help="which generator of the snapshot (default: %(default)s, the averaged one)")
    parser.add_argument("--force", action="store_true", help="replace OUT_PT (and its sidecar) if they exist")
    parser.epilog = ("Supported: StyleGAN2-ADA (PyTorch) generators, architecture 'skip', channel_base 16384 or "
                     "32768 with channel_max 512, 64-1024 px, unconditional. Refused with one line: conditional, "
                     "StyleGAN3, 'resnet'/'orig' synthesis, TensorFlow pickles of the original StyleGAN2, and any "
                     "pickle that would import anything beyond tensors, containers and NVIDIA's module records.\n"
                     "Use the result as train.generator (a .pkl works there too: converted once per machine).")


def sidecar_path(output: Path) -> Path:
    """Where the provenance of a converted generator goes: OUT_PT.json."""
    return output.with_name(output.name + ".json")


def run(args: argparse.Namespace) -> int:
    output, sidecar = args.output, sidecar_path(args.output)
    source = fetch_weights(args.pickle)
    if output.resolve() == source.resolve():
        raise InputError(f"{output}: the output would replace the pickle it is converted from")
    for existing in (output, sidecar):
        if existing.is_dir():
            raise InputError(f"{existing}: a folder; name a file to write")
        if existing.exists() and not args.force:
            raise InputError(f"{existing} exists; pass --force to replace it")
    converted = read_ada_generator(source, args.network)
    save_generator(converted.generator, converted.latent_avg, output)
    write_json_atomic(sidecar, {
        "source": Path(source).name, "source_sha256": file_digest(source), "network": args.network,
        "format": "stylegan2-ada network pickle, read as data", "config": converted.config.as_dict(),
        "output": output.name, "output_sha256": file_digest(output), "n_latent": converted.generator.n_latent,
    })
    config = converted.config
    clamp = f", conv_clamp {config.conv_clamp:g}" if config.conv_clamp is not None else ""
    print(f"wrote {output} ({args.network}: {config.resolution} px, channel_base {config.channel_base}, "
          f"{converted.generator.n_latent} styles{clamp}) and {sidecar.name}")
    return 0
