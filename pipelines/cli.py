"""`psp`: one console script, one subcommand per pipeline stage.

Every stage subcommand takes `--params FILE` and `key=value` overrides, the same keys
`dvc exp run -S` takes (`psp align align.output_size=128` or `psp align output_size=128`).
Stage modules are imported only when their command runs, and after its params are validated: `psp --help`
and a mistake in the params are answered at once, not after the stage's imports (torch, Ray, MLflow).

A user mistake (a bad setting, a missing or unusable file) is one line on stderr and exit 2;
Ctrl-C or SIGTERM is one line and exit 130 / 143; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Sequence

from pipelines.params.loading import load_section
from pipelines.params.schema import SECTIONS, describe
from pipelines.services.storage.credentials import scrub
from psp_core.errors import InputError

USER_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


@dataclass(frozen=True)
class Command:
    """A subcommand: its module (with `run(args) -> int`, optionally `add_arguments(parser)`),
    one line of help, its params section (None: it takes no key=value overrides), an example, and whether its
    module adds arguments of its own (else `add_arguments` only writes the help's notes)."""

    module: str
    help: str
    section: str | None
    example: str
    own_arguments: bool = False


COMMANDS: dict[str, Command] = {
    "sample": Command("pipelines.stages.sample", "build the embedded sample photo folder (data/raw) from installed packages' photos",
                      "sample", "psp sample sample.augmented_copies=4"),
    "align": Command("pipelines.stages.align", "FFHQ-align the faces of a photo folder (dlib landmarks), with a rejects table",
                     "align", "psp align align.input_dir=~/photos align.output_size=1024 align.supersample=4"),
    "shard": Command("pipelines.stages.shard", "pack aligned images into Parquet shards with a train/test split and a manifest",
                     "shard", "psp shard shard.split_by=folder shard.test_fraction=0.1"),
    "train": Command("pipelines.stages.train", "train a pSp encoder on Ray Train (DDP), tracked in MLflow, registered at the end",
                     "train", "psp train train.num_workers=2 train.max_steps=1000 train.precision=bf16"),
    "invert": Command("pipelines.stages.invert", "batch-invert images or shards into W+ with Ray Data and a registered encoder",
                      "invert", "psp invert invert.model=models:/psp-encoder@champion invert.input=~/faces invert.aligned=false"),
    "edit": Command("pipelines.stages.edit", "edit inverted W+ codes along InterFaceGAN, GANSpace or SeFa directions: images, latents, grids",
                    "edit", "psp edit edit.edits='[{kind: interfacegan, direction: age, start: -3, end: 3, steps: 7}]'"),
    "submit": Command("pipelines.stages.submit", "run `psp train` as a job on a Ray cluster (ray job submit, code uploaded without data)",
                      "train", "RAY_ADDRESS=http://head:8265 psp submit train.num_workers=8 train.use_gpu=true", True),
    "evaluate": Command("pipelines.stages.evaluate", "score an encoder on the test split: L2, LPIPS, MS-SSIM, identity, time per image",
                        "evaluate", "psp evaluate evaluate.model=models:/psp-encoder/3 evaluate.max_images=500"),
    "import-checkpoint": Command("pipelines.stages.import_checkpoint",
                                "register a released encoder checkpoint (.pt; HyperStyle with its W encoder) as a new psp-encoder version",
                                None, "psp import-checkpoint pretrained_models/psp_ffhq_encode.pt --alias champion", True),
    "import-generator": Command("pipelines.stages.import_generator",
                                "convert a StyleGAN2-ADA network pickle (.pkl) into a generator file, without running it",
                                None, "psp import-generator network-snapshot-025000.pkl pretrained_models/afhqcat.pt", True),
    "lineage": Command("pipelines.stages.lineage",
                       "trace a registered encoder: run, datasets, DVC stages, weights, evaluation; every hash rechecked",
                       None, "psp lineage models:/psp-encoder@champion --json", True),
    "promote": Command("pipelines.stages.promote",
                       "point an alias (champion) at an encoder version, optionally only if it evaluates better",
                       None, "psp promote candidate --if-better lpips", True),
}


_TERMINATED: list[bool] = []


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM stops a stage exactly as Ctrl-C does (Ray's C++ frames only pass KeyboardInterrupt through)."""
    _TERMINATED.append(True)
    raise KeyboardInterrupt


class ScrubbingFormatter(logging.Formatter):
    """Log lines with credentials removed (`scrub`): whatever a message quotes, no secret reaches the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def _help_epilog(name: str, command: Command, notes: str | None) -> str:
    """The notes a module gives, every key of its params section (from the schema), and an example."""
    parts = [notes] if notes else []
    if command.section is not None:
        parts.append(f"keys of the {command.section} section (params.yaml, or key=value here):\n"
                     + "\n".join(describe(SECTIONS[command.section], command.section)))
    parts.append(f"example:\n  {command.example}")
    return "\n\n".join(parts)


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psp",
        description="pSp (pixel2style2pixel) pipeline: align, shard, train, invert, evaluate.",
        epilog="Run `psp COMMAND --help` for a command's keys and an example.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    helping = bool({"-h", "--help"} & set(argv))
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        if name == chosen and (command.own_arguments or helping):
            mod = importlib.import_module(command.module)
            if hasattr(mod, "add_arguments"):
                mod.add_arguments(p)
            p.epilog = _help_epilog(name, command, p.epilog)
        if command.section is not None:
            p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
            p.add_argument("overrides", nargs="*", metavar="key=value",
                           help=f"override a params value, e.g. {command.section}.KEY=VALUE (as `dvc exp run -S`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen stage, and turn user errors and interrupts into one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)
    signal.signal(signal.SIGTERM, _terminate)
    command = COMMANDS[args.command]
    try:
        if command.section is not None:   # a mistake in the params: one line before the stage's imports
            load_section(command.section, SECTIONS[command.section], args.overrides, args.params)
        module = importlib.import_module(command.module)
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        print(f"psp {args.command}: error: {scrub(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how, code = ("terminated", 143) if _TERMINATED else ("interrupted", 130)
        print(f"psp {args.command}: {how}; finished work is kept and a rerun resumes", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
