"""`psp lineage MODEL_URI`: where an encoder came from, every link checked against the files.

The chain: registered version -> training run (params, git commit, start/end) -> the datasets it
read (MLflow datasets: digest = the shard manifest's sha256, rows, source) -> the DVC stages that
produced those shards (their `dvc.lock` hashes at the run's commit) -> the weights files the run
started from (sha256, or RANDOM) -> the version's evaluation. Each link that can be recomputed
from files on this machine is: the manifest hash, every shard file's sha256, the weights files.

How a run records that chain (the shard datasets it logs as MLflow inputs, the weights fingerprints it
tags) is the tracking service's; this command only reads it back: it writes nothing, anywhere.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipelines.services import tracking
from pipelines.services.storage import file_digest
from pipelines.services.tracking import RANDOM, WEIGHTS_TAG_PREFIX
from psp_core.data.shards import MANIFEST_FILE, ShardManifest
from psp_core.errors import InputError

# ----------------------------------------------------------------------------- reading it back

@dataclass(frozen=True)
class Check:
    """One link recomputed from files: what, the recorded value, what the files say now, and the verdict."""

    what: str
    recorded: str
    found: str

    @property
    def verdict(self) -> str:
        if self.found in ("absent", "unknown"):
            return "not checked (" + self.found + ")"
        return "matches" if self.found == self.recorded else "DOES NOT MATCH"


def lineage(model_uri: str, repo: Path = Path(".")) -> dict[str, Any]:
    """The chain behind a registered version, as a JSON-ready dict, with every recomputable link checked."""
    ref = tracking.parse_registry_uri(model_uri)
    if ref is None:
        raise InputError(f"{model_uri!r}: give a registered version, models:/NAME/VERSION or models:/NAME@ALIAS")
    tracking.use_tracking_store(create=False)   # a read-only command creates no store
    version = tracking.resolve_version(ref)
    client = tracking.client()
    if not version.run_id:
        raise InputError(f"{model_uri}: version {version.version} has no MLflow run to trace")
    run = client.get_run(version.run_id)
    tags, params = run.data.tags, run.data.params
    commit = tags.get(tracking.GIT_COMMIT_TAG, "unknown")
    datasets = [dataset_link(item) for item in run.inputs.dataset_inputs]
    sources = sorted({d["source"] for d in datasets})
    return {
        "version": {"name": version.name, "version": str(version.version), "aliases": list(version.aliases or []),
                    "description": version.description or "", "source": tags.get(tracking.SOURCE_TAG)},
        "run": {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                "start": _time(run.info.start_time), "end": _time(run.info.end_time), "git_commit": commit,
                "params": dict(sorted(params.items()))},
        "datasets": datasets,
        "dvc_stages": dvc_stages(repo, commit, sources),
        "weights": weights_links(tags, params),
        "evaluation": {k: v for k, v in sorted((version.tags or {}).items()) if k.startswith(tracking.EVAL_PREFIX)},
    }


def dataset_link(item: Any) -> dict[str, Any]:
    """A logged dataset input, checked against the shard folder it names (manifest hash, each shard's sha256)."""
    dataset = item.dataset
    source = json.loads(dataset.source).get("uri", dataset.source)
    context = tracking.dataset_context(item)
    rows = json.loads(dataset.profile).get("num_rows") if dataset.profile else None
    checks = [asdict_check(c) for c in shard_checks(Path(source), dataset.digest)]
    return {"name": dataset.name, "context": context, "digest": dataset.digest, "rows": rows, "source": source,
            "checks": checks}


def shard_checks(folder: Path, digest: str) -> list[Check]:
    """The manifest's sha256 against the recorded digest, and each shard file against the manifest."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return [Check(f"{manifest_path}", digest, "absent")]
    checks = [Check(f"{manifest_path} sha256", digest, file_digest(manifest_path)[:len(digest)])]
    manifest = ShardManifest.parse(manifest_path.read_bytes(), str(manifest_path))
    for entry in manifest.shards:
        path = folder / entry["file"]
        checks.append(Check(f"{path} sha256", entry["sha256"], file_digest(path) if path.is_file() else "absent"))
    return checks


def weights_links(tags: dict[str, str], params: dict[str, str]) -> list[dict[str, str]]:
    """The weights the run started from (recorded fingerprints) and whether the files at the recorded
    paths are still those."""
    links = []
    for key in sorted(k for k in tags if k.startswith(WEIGHTS_TAG_PREFIX)):
        network, recorded = key[len(WEIGHTS_TAG_PREFIX):], tags[key]
        path = params.get(network) if network in ("generator", "irse50") else None
        found = "unknown"
        if recorded == RANDOM:
            found = RANDOM
        elif path and Path(path).is_file():
            found = f"sha256:{file_digest(Path(path))}"
        elif path:
            found = "absent"
        links.append({"network": network, "path": path or "", **asdict_check(Check(network, recorded, found))})
    return links


def dvc_stages(repo: Path, commit: str, sources: list[str]) -> dict[str, Any]:
    """The `dvc.lock` entries of the stages whose outputs are the given shard folders, and of the stages
    upstream of them (align, sample). The lock is taken from the run's commit or the working tree,
    whichever records these very files: each output folder's listing in the DVC cache (`<md5>.dir`)
    is checked file by file (md5) against the folder as it is now."""
    candidates = []
    if commit != "unknown":
        shown = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0:
            where = f"dvc.lock at commit {commit[:12]}"
            candidates.append((where, lock_stages(shown.stdout, where)))
    if (repo / "dvc.lock").is_file():
        where = "dvc.lock of the working tree"
        candidates.append((where, lock_stages((repo / "dvc.lock").read_bytes().decode("utf-8", "replace"), where)))
    root = repo.resolve()
    wanted = [_relative(Path(s), root) for s in sources]
    found: dict[str, Any] = {"from": "no dvc.lock", "verified": "no", "stages": {}}
    for where, stages in candidates:
        stages = producing_stages(stages, set(wanted))
        checks = [dvc_output_check(repo, path, md5) for stage in stages.values() for path, md5 in stage["outs"].items()
                  if path in wanted]
        entry = {"from": where, "verified": "; ".join(checks) or "no", "stages": stages}
        if stages and checks and all(c.startswith("matches") for c in checks):
            return entry
        if stages and not found["stages"]:
            found = entry
    return found


def lock_stages(text: str, where: str) -> dict[str, Any]:
    """The `stages` of a dvc.lock's text, each with its `outs` and `deps` lists of `{path, md5}`; a file that is
    not such a lock (garbled, or another format) is one line."""
    try:
        lock = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    stages = lock.get("stages", {}) if isinstance(lock, dict) else None

    def entries_ok(stage: Any) -> bool:
        return isinstance(stage, dict) and all(
            isinstance(stage.get(kind, []), list)
            and all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in stage.get(kind, []))
            for kind in ("outs", "deps"))

    if not isinstance(stages, dict) or not all(entries_ok(stage) for stage in stages.values()):
        raise InputError(f"{where}: not a dvc.lock (a `stages` mapping whose outs and deps have paths)")
    return stages


def producing_stages(stages: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """The lock entries of the stages that output `paths`, and of those upstream of them."""
    chosen: dict[str, Any] = {}
    while paths:
        path = paths.pop()
        for name, stage in stages.items():
            outs = {o["path"]: o.get("md5") for o in stage.get("outs", [])}
            if path in outs and name not in chosen:
                chosen[name] = {"cmd": stage.get("cmd"), "outs": outs,
                                "deps": {d["path"]: d.get("md5") for d in stage.get("deps", [])}}
                paths |= {d["path"] for d in stage.get("deps", []) if not d["path"].endswith(".py")}
    return chosen


def dvc_output_check(repo: Path, path: str, md5: str | None) -> str:
    """Whether a folder output recorded as `md5` (`....dir`) is, file by file, the folder now."""
    if not md5 or not md5.endswith(".dir"):
        return f"not checked ({path}: not a folder output)"
    listing_file = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not listing_file.is_file():
        return f"not checked ({path}: {md5} not in the DVC cache; `dvc pull` brings it)"
    listing = json.loads(listing_file.read_text())
    changed = [item["relpath"] for item in listing
               if not (repo / path / item["relpath"]).is_file()
               or file_digest(repo / path / item["relpath"], "md5") != item["md5"]]
    if changed:
        return f"DOES NOT MATCH ({path}: {len(changed)} of {len(listing)} files differ, e.g. {changed[0]})"
    return f"matches ({path}: {len(listing)} files)"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def asdict_check(check: Check) -> dict[str, str]:
    return {"what": check.what, "recorded": check.recorded, "found": check.found, "verdict": check.verdict}


def _time(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the command

KEY_PARAMS = ("preset", "encoder_type", "output_size", "encoder_input_size", "max_steps", "batch_size",
              "num_workers", "learning_rate", "shards")


def render(chain: dict[str, Any]) -> str:
    """One screen of text: the chain top to bottom, every check with its verdict."""
    v, run = chain["version"], chain["run"]
    aliases = " ".join(f"@{a}" for a in v["aliases"])
    lines = [f"{v['name']} version {v['version']} {aliases}".rstrip()]
    if v["source"]:
        lines.append(f"  imported from {v['source']}")
    lines.append(f"  run {run['id']} ({run['name']}, {run['status']}) {run['start']} -> {run['end']}")
    lines.append(f"  git commit {run['git_commit']}")
    shown = [f"{k}={run['params'][k]}" for k in KEY_PARAMS if k in run["params"]]
    if shown:
        lines.append("  params " + " ".join(shown))
    for dataset in chain["datasets"]:
        lines.append(f"  dataset {dataset['name']} ({dataset['context']}): {dataset['rows']} rows, "
                     f"digest {dataset['digest'][:16]}, source {dataset['source']}")
        bad = [c for c in dataset["checks"] if c["verdict"] != "matches"]
        ok = len(dataset["checks"]) - len(bad)
        lines.append(f"    {ok} of {len(dataset['checks'])} files match the recorded hashes")
        lines.extend(f"    {c['verdict']}: {c['what']} (recorded {c['recorded'][:16]}, now {c['found'][:16]})"
                     for c in bad)
    dvc = chain["dvc_stages"]
    lines.append(f"  produced by ({dvc['from']}; against the DVC cache: {dvc['verified']}):")
    for name, stage in dvc["stages"].items():
        outs = ", ".join(f"{p} {str(m)[:12]}" for p, m in stage["outs"].items())
        lines.append(f"    {name}: `{stage['cmd']}` -> {outs}")
    if not dvc["stages"]:
        lines.append("    no dvc.lock stage lists these datasets")
    for weights in chain["weights"]:
        recorded = "RANDOM weights" if weights["recorded"] == RANDOM else weights["recorded"][:23]
        lines.append(f"  weights {weights['network']}: {recorded} ({weights['verdict']})")
    evaluation = chain["evaluation"]
    if evaluation:
        values = [f"{k[5:]}={float(evaluation[k]):.4g}" for k in map(tracking.eval_key, tracking.COMPARABLE_METRICS) if k in evaluation]
        lines.append(f"  evaluation on {evaluation.get('eval_dataset', '?')}: " + " ".join(values))
    else:
        lines.append("  evaluation: none (run `psp evaluate`)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON (for machines)")
    parser.add_argument("--partial", action="store_true",
                        help="accept links whose files are not on this machine (shards or weights elsewhere): "
                             "shown as not checked, and exit 0 if all the others match")
    parser.epilog = ("Reads the MLflow store (MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db; it must exist) "
                     "and, when run in the repository, git and dvc.lock; writes nothing. Exit status 1 when a "
                     "recomputed hash does not match, or when data or weights could not be checked (absent here) "
                     "unless --partial.")


def outcome(chain: dict[str, Any], partial: bool) -> tuple[int, str | None]:
    """The exit status of a traced chain and, when it is not 0, why in one line: a link that does not match, or
    (unless `partial`) data or weights that could not be checked here."""
    verdicts = [c["verdict"] for d in chain["datasets"] for c in d["checks"]] + [w["verdict"] for w in chain["weights"]]
    if "DOES NOT MATCH" in verdicts or chain["dvc_stages"]["verified"].startswith("DOES NOT MATCH"):
        return 1, "psp lineage: a recomputed hash DOES NOT MATCH the record"
    unchecked = sum(v == "not checked (absent)" for v in verdicts)
    if unchecked and not partial:
        return 1, (f"psp lineage: {unchecked} recorded file(s) absent here, so not checked; "
                   "run where the data is, or pass --partial to accept a partial check")
    return 0, None


def run(args: argparse.Namespace) -> int:
    chain = lineage(args.model)
    print(json.dumps(chain, indent=2) if args.json else render(chain))
    code, why = outcome(chain, args.partial)
    if why:
        print(why, file=sys.stderr)
    return code
