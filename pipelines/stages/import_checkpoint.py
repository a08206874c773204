"""`psp import-checkpoint`: register a released encoder checkpoint (pSp, ReStyle-pSp, ReStyle-e4e, e4e or HyperStyle,
e.g. psp_ffhq_encode.pt, restyle_psp_ffhq_encode.pt, e4e_ffhq_encode.pt, hyperstyle_ffhq.pt with its W encoder
faces_w_encoder.pt) as a new encoder version."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.services.tracking import DEFAULT_REGISTERED_MODEL, IMPORT_EXPERIMENT, import_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="FILE",
                        help="pSp / ReStyle / e4e / HyperStyle checkpoint {'state_dict', 'opts', 'latent_avg'}; "
                             "the family is read from opts; loaded strictly, weights only")
    parser.add_argument("--w-encoder", type=Path, default=None, metavar="FILE",
                        help="HyperStyle only: its W encoder file (default: the file its opts name, beside the "
                             "checkpoint or in pretrained_models/); the version carries both")
    parser.add_argument("--name", default=DEFAULT_REGISTERED_MODEL,
                        help="registered model to add the version to (default: %(default)s)")
    parser.add_argument("--alias", default=None, help="alias to point at the new version (default: none)")
    parser.epilog = (f"The version's MLflow run (experiment {IMPORT_EXPERIMENT}) holds the checkpoint's opts as "
                     "params and its file name and sha256 (a HyperStyle one's W encoder's too) as tag "
                     "psp.source_checkpoint. MLflow store: MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db.")


def run(args: argparse.Namespace) -> int:
    version = import_checkpoint(args.checkpoint, args.name, args.alias, args.w_encoder)
    alias = f" as @{args.alias}" if args.alias else ""
    print(f"registered {args.checkpoint.name} as {args.name} version {version.version}{alias}")
    return 0
