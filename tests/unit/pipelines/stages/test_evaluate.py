"""`psp evaluate` on real shards, a real tiny pSp and a real SQLite MLflow registry."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from PIL import Image

from helpers.pipelines import make_shards, per_image_metrics, reference_lpips
from helpers.tracking import tracking_store
from pipelines.cli import main
from pipelines.services import tracking
from pipelines.services.tracking import import_checkpoint
from psp_core import PSP, PSPArchitecture, load_psp, save_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.data.shards import iter_shard_batches, read_manifest, shard_paths

NAME = tracking.DEFAULT_REGISTERED_MODEL


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Shards, a tiny pSp checkpoint registered as version 1 @candidate, and a params file, in one store."""
    root = tmp_path_factory.mktemp("evaluate")
    with tracking_store(root):
        shards = make_shards(root)
        torch.manual_seed(0)
        net = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
        net.set_latent_avg(torch.zeros(512))
        checkpoint = save_psp(net, root / "tiny.pt")
        import_checkpoint(checkpoint, NAME, "candidate")
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump({"evaluate": {
            "model": f"models:/{NAME}@candidate",
            "shards": str(shards), "batch_size": 2, "lpips_backbone": "random", "device": "cpu", "precision": "fp32",
            "irse50": str(root / "absent_model_ir_se50.pth"),
            "report": str(root / "reports/eval.json"), "per_image": str(root / "reports/eval_images.csv"),
            "grid": str(root / "reports/eval_grid.png")}}))
        yield root


def evaluate(root: Path, *overrides: str) -> int:
    return main(["evaluate", "--params", str(root / "params.yaml"), *overrides])


def direct_metrics(checkpoint: Path, shards: Path) -> dict[str, dict[str, float]]:
    """Per-image L2, LPIPS and MS-SSIM recomputed by hand: the reference inference forward on the test
    images, then each image scored alone with the `lpips` and `pytorch_msssim` packages."""
    net = load_psp(checkpoint)
    transform = PresetTransform(get_preset("encode"), 32, train=False)
    lpips_net = reference_lpips()
    values = {}
    with torch.no_grad():
        for batch in iter_shard_batches(shard_paths(shards), 4, split="test"):
            images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
            source, target = transform(images, images, torch.Generator())
            output = net(source, resize=True, randomize_noise=False).clamp(-1, 1)
            values.update(zip(batch.ids, per_image_metrics(output, target, lpips_net)))
    return values


def test_evaluate_registered_version(workspace):
    assert evaluate(workspace) == 0
    report = json.loads((workspace / "reports/eval.json").read_text())
    n_test = read_manifest(workspace / "shards").rows["test"]
    assert report["n_images"] == n_test > 0
    assert report["model_version"] == "1" and report["registered_model"] == NAME
    assert report["lpips_backbone"] == "random" and "lpips_alexnet" in report["random_weights"]
    for key in ("l2", "lpips", "ms_ssim", "seconds_per_image"):
        assert math.isfinite(report[key]), key
    # synthetic images have no faces: dlib finds none, so identity is null with every image counted missing
    assert report["id_backend"] == "dlib_resnet_v1"
    assert report["id_similarity"] is None and report["id_similarity_missing"] == n_test

    expected = direct_metrics(workspace / "tiny.pt", workspace / "shards")
    with (workspace / "reports/eval_images.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == list(expected) and len(rows) == n_test
    for metric in ("l2", "lpips", "ms_ssim"):
        for row in rows:
            assert float(row[metric]) == pytest.approx(expected[row["id"]][metric], rel=1e-4, abs=1e-6), metric
        assert report[metric] == pytest.approx(sum(e[metric] for e in expected.values()) / n_test, rel=1e-4)
        assert len({row[metric] for row in rows}) == n_test, f"{metric}: one value per image, not a batch mean"
    assert all(row["id_similarity"] == "" for row in rows)

    shown = min(8, n_test)
    with Image.open(workspace / "reports/eval_grid.png") as grid:
        assert grid.size == (shown * 256 + (shown + 1) * 2, 2 * 256 + 3 * 2)

    tracking.use_tracking_store()
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")
    run = client.get_run(version.run_id)
    assert run.data.metrics["eval_l2"] == pytest.approx(report["l2"])
    assert run.data.metrics["eval_lpips"] == pytest.approx(report["lpips"])
    assert "eval_id_similarity" not in run.data.metrics
    assert float(version.tags["eval_l2"]) == pytest.approx(report["l2"])
    assert float(version.tags["eval_ms_ssim"]) == pytest.approx(report["ms_ssim"])
    assert version.tags["eval_id_backend"] == "dlib_resnet_v1"
    assert version.tags["eval_lpips_backbone"] == "random"
    logged = {Path(a.path).name for a in client.list_artifacts(version.run_id, "eval")}
    assert logged == {"eval.json", "eval_images.csv", "eval_grid.png"}


def test_evaluate_checkpoint_file_limits_images_and_logs_nothing(workspace):
    tracking.use_tracking_store()
    before = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    report_path = workspace / "file_eval.json"
    assert evaluate(workspace, f"model={workspace / 'tiny.pt'}", "max_images=1",
                    f"report={report_path}") == 0
    report = json.loads(report_path.read_text())
    assert report["n_images"] == 1 and report["model_version"] is None
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags == before


@pytest.mark.parametrize("overrides, message", [
    (["model=models:/psp-encoder@champion"], "no version of psp-encoder has alias champion"),
    (["shards=/nonexistent/shards"], "manifest.json not found: run `psp shard` first"),
    (["split=train", "shards={empty}"], "the train split is empty"),
])
def test_evaluate_errors_are_one_line(workspace, capsys, overrides, message):
    empty = workspace / "all_test"
    if not (empty / "shards").is_dir():
        make_shards(empty, images=2, test_fraction=1.0)
    overrides = [o.format(empty=empty / "shards") for o in overrides]
    assert evaluate(workspace, *overrides) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


def test_restyle_curve_and_comparison_table(workspace):
    """A ReStyle version scored at every refinement step (checked against `refine` by hand), compared with
    the pSp version on the same images: JSON, Markdown and a side-by-side grid, and the MLflow curve."""
    from psp_core import refine

    torch.manual_seed(1)
    restyle = PSP(PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6,
                                  output_size=16, encoder_input_size=32))
    restyle.set_latent_avg(0.1 * torch.randn(restyle.n_styles, 512))
    import_checkpoint(save_psp(restyle.eval(), workspace / "restyle.pt"), NAME)
    restyle_version = str(len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")))
    prefix = workspace / "reports/compare"
    assert evaluate(workspace, f"model=models:/{NAME}/{restyle_version}", f"compare=[models:/{NAME}/1]",
                    "n_iters=3", f"comparison={prefix}", f"report={workspace / 'restyle_eval.json'}") == 0

    report = json.loads((workspace / "restyle_eval.json").read_text())
    assert report["family"] == "restyle_psp" and report["n_iters"] == 3
    steps = report["per_iteration"]
    assert [s["iteration"] for s in steps] == [1, 2, 3] and report["l2"] == steps[-1]["l2"]
    transform = PresetTransform(get_preset("encode"), 32, train=False)
    by_hand = [[], [], []]
    with torch.no_grad():
        for batch in iter_shard_batches(shard_paths(workspace / "shards"), 4, split="test"):
            images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
            source, target = transform(images, images, torch.Generator())
            for step, (output, _) in enumerate(refine(restyle, source, 3)):
                pooled = torch.nn.functional.adaptive_avg_pool2d(output, 256).clamp(-1, 1)
                by_hand[step] += (pooled - target).pow(2).flatten(1).mean(1).tolist()
    for step, values in zip(steps, by_hand):
        assert step["l2"] == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert len({round(s["l2"], 6) for s in steps}) == 3, "every step must be scored on its own output"

    compared = json.loads(prefix.with_suffix(".json").read_text())["models"]
    assert [m["model"] for m in compared] == [f"models:/{NAME}/{restyle_version}", f"models:/{NAME}/1"]
    assert compared[1]["family"] == "psp" and compared[1]["per_iteration"] == []
    assert compared[0]["n_images"] == compared[1]["n_images"] == report["n_images"]
    table = prefix.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("| model | family | steps | l2 |") and f"models:/{NAME}/1 | psp | 1 |" in table[3]
    shown = min(8, report["n_images"])
    with Image.open(prefix.with_suffix(".png")) as grid:     # inputs, then each model's final output
        assert grid.size == (shown * 256 + (shown + 1) * 2, 3 * 256 + 4 * 2)
    with Image.open(workspace / "reports/eval_grid.png") as grid:   # inputs, then each ReStyle step
        assert grid.size[1] == 4 * 256 + 5 * 2

    tracking.use_tracking_store()
    client = mlflow.MlflowClient()
    run_id = client.get_model_version(NAME, restyle_version).run_id
    history = client.get_metric_history(run_id, "eval_l2")
    assert [(m.step, pytest.approx(m.value, rel=1e-6)) for m in sorted(history, key=lambda m: m.step)] == \
        [(i, s["l2"]) for i, s in enumerate(steps, start=1)]
    assert client.get_model_version(NAME, restyle_version).tags["eval_n_iters"] == "3"
    assert client.get_model_version(NAME, "1").tags["eval_n_iters"] == "1"


@pytest.fixture(scope="module")
def hyperstyle_file(workspace) -> Path:
    """The small HyperStyle checkpoint, its W encoder beside it (where evaluate's `load_psp` finds it)."""
    from helpers.hyperstyle import write_hyperstyle

    return write_hyperstyle(workspace / "hyperstyle")[0]


def test_hyperstyle_curve_in_the_comparison_table(workspace, hyperstyle_file):
    """HyperStyle scored at every iteration (checked against `hyperstyle_steps` by hand) beside the pSp version in
    one comparison table, as ReStyle is."""
    from psp_core import hyperstyle_steps

    prefix = workspace / "reports/compare_hyperstyle"
    report_path = workspace / "hyperstyle_eval.json"
    assert evaluate(workspace, f"model={hyperstyle_file}", f"compare=[models:/{NAME}/1]", "n_iters=2", "max_images=2",
                    f"comparison={prefix}", f"report={report_path}", "log_to_mlflow=false") == 0

    report = json.loads(report_path.read_text())
    assert report["family"] == "hyperstyle" and report["n_iters"] == 2 and report["n_images"] == 2
    steps = report["per_iteration"]
    assert [s["iteration"] for s in steps] == [1, 2] and report["l2"] == steps[-1]["l2"]
    net = load_psp(hyperstyle_file)
    transform = PresetTransform(get_preset("encode"), net.arch.encoder_input_size, train=False)
    batch = next(iter_shard_batches(shard_paths(workspace / "shards"), 2, split="test"))
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
    source, target = transform(images, images, torch.Generator())
    with torch.no_grad():
        by_hand = [(torch.nn.functional.adaptive_avg_pool2d(step.images, 256).clamp(-1, 1) - target).pow(2).mean()
                   for step in hyperstyle_steps(net, source, 2)]
    assert [s["l2"] for s in steps] == [pytest.approx(float(v), rel=1e-4) for v in by_hand]
    assert steps[0]["l2"] != pytest.approx(steps[1]["l2"], rel=1e-6), "every step must be scored on its own output"

    compared = json.loads(prefix.with_suffix(".json").read_text())["models"]
    assert [m["family"] for m in compared] == ["hyperstyle", "psp"] and compared[1]["per_iteration"] == []
    table = prefix.with_suffix(".md").read_text().splitlines()
    assert f"| {report['model']} | hyperstyle | 2 |" in table[2] and f"models:/{NAME}/1 | psp | 1 |" in table[3]
