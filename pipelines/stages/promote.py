"""`psp promote`: point an alias (default champion) at an encoder version, optionally only if it evaluates better."""
from __future__ import annotations

import argparse

from pipelines.services.tracking import (
    DEFAULT_CHAMPION,
    DEFAULT_REGISTERED_MODEL,
    HIGHER_IS_BETTER,
    VersionRef,
    promote,
    use_tracking_store,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", metavar="VERSION|ALIAS",
                        help="the version to promote: a number, or an alias such as candidate")
    parser.add_argument("--name", default=DEFAULT_REGISTERED_MODEL, help="registered model (default: %(default)s)")
    parser.add_argument("--to", default=DEFAULT_CHAMPION, help="alias to move (default: %(default)s)")
    parser.add_argument("--if-better", metavar="METRIC", default=None,
                        help="move only if the version's evaluation of METRIC (e.g. eval_lpips) beats the "
                             "version holding the alias; higher is better for "
                             f"{', '.join(HIGHER_IS_BETTER)}, lower for the others")
    parser.epilog = ("With --if-better both versions need `psp evaluate` results on the same data. "
                     "Not moving is not an error: the reason is printed and the exit status is 0.")


def run(args: argparse.Namespace) -> int:
    use_tracking_store(create=False)   # versions to promote live in an existing store: none is created here
    outcome = promote(VersionRef(args.name, args.version), args.to, args.if_better)
    if outcome.moved:
        print(f"{args.name} @{args.to} -> version {outcome.version} ({outcome.reason})")
    else:
        print(f"{args.name} @{args.to} not moved: {outcome.reason}")
    return 0
