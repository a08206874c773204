"""`psp`: one console script, one subcommand per pipeline stage.

Every stage subcommand takes `--params FILE` and `key=value` overrides, the same keys
`dvc exp run -S` takes (`psp align align.output_size=128` or `psp align output_size=128`).
Stage modules are imported only when their command runs, so `psp --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from pipelines.config import ConfigError

# name -> (module, one-line help). A module provides `add_arguments(parser)` (optional) and
# `run(args) -> int`; `args.params` and `args.overrides` are always there.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("pipelines.sample", "build the embedded sample photo folder (data/raw) from installed packages' photos"),
    "align": ("pipelines.align", "FFHQ-align the faces of a photo folder (dlib landmarks), with a rejects table"),
    "shard": ("pipelines.shard", "pack aligned images into Parquet shards with a train/test split and a manifest"),
    "train": ("pipelines.train", "train a pSp encoder on Ray Train (DDP), tracked in MLflow, registered at the end"),
    "invert": ("pipelines.invert", "batch-invert images or shards into W+ with Ray Data and a registered encoder"),
    "submit": ("pipelines.submit", "run `psp train` as a job on a Ray cluster (ray job submit, code uploaded without data)"),
    "evaluate": ("pipelines.evaluate", "score an encoder on the test split: L2, LPIPS, MS-SSIM, identity, time per image"),
    "import-checkpoint": ("pipelines.import_checkpoint", "register a released pSp checkpoint (.pt) as a new psp-encoder version"),
    "promote": ("pipelines.promote", "point an alias (champion) at an encoder version, optionally only if it evaluates better"),
}


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psp",
        description="pSp (pixel2style2pixel) pipeline: align, shard, train, invert, evaluate.",
        epilog="Run `psp COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value",
            help="override a params value, e.g. align.output_size=128 (as `dvc exp run -S`)",
        )
        if name == chosen:
            mod = importlib.import_module(module)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen stage, and turn expected errors into one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"psp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
