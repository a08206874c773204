"""`psp import-checkpoint` and `psp promote` against a real SQLite MLflow registry."""
from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.parity import FIXTURES, write_released_psp
from helpers.tracking import tracking_store
from pipelines.cli import main
from pipelines.services import tracking
from pipelines.services.tracking import SOURCE_TAG
from psp_core.errors import InputError

NAME = tracking.DEFAULT_REGISTERED_MODEL


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite tracking store for this module, selected through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("registry")
    with tracking_store(root):
        yield root


@pytest.fixture(scope="module")
def parity_checkpoint(store) -> Path:
    """A released-layout pSp checkpoint whose weights follow the parity rule (64px GradualStyleEncoder)."""
    return write_released_psp(store / "psp_gradual64.pt")


@pytest.fixture(scope="module")
def imported(store, parity_checkpoint) -> str:
    """`psp import-checkpoint` of the parity checkpoint; returns the registered version."""
    assert main(["import-checkpoint", str(parity_checkpoint)]) == 0
    return "1"


def client() -> mlflow.MlflowClient:
    tracking.use_tracking_store()
    return mlflow.MlflowClient()


def test_import_checkpoint_registers_the_reference_function(imported, parity_checkpoint):
    ref = np.load(FIXTURES / "ref_gradual64.npz")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{imported}")
    latent = model.predict(ref["input"].astype(np.float32))
    tolerance = 1e-4 * max(1.0, float(np.abs(ref["latent"]).max()))
    np.testing.assert_allclose(latent, ref["latent"], rtol=0, atol=tolerance)

    version = client().get_model_version(NAME, imported)
    run = client().get_run(version.run_id)
    assert client().get_experiment(run.info.experiment_id).name == "psp-imports"
    assert run.data.tags[SOURCE_TAG] == f"psp_gradual64.pt sha256:{hashlib.sha256(parity_checkpoint.read_bytes()).hexdigest()}"
    assert run.data.params["encoder_type"] == "GradualStyleEncoder"
    assert run.data.params["output_size"] == "64"
    assert not client().get_registered_model(NAME).aliases


def test_wrong_architecture_is_refused_and_registers_nothing(imported, store, capsys):
    wrong = store / "wrong.pt"   # one mapping-layer tensor: every other tensor its opts describe is missing
    torch.save({"state_dict": {"decoder.style.1.weight": torch.zeros(512, 512)}, "latent_avg": torch.zeros(512),
                "opts": {"encoder_type": "GradualStyleEncoder", "output_size": 64}}, wrong)
    before = len(client().search_model_versions(f"name='{NAME}'"))

    assert main(["import-checkpoint", str(wrong), "--alias", "candidate"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("psp import-checkpoint: error:") and "does not match the architecture" in error
    assert len(error.splitlines()) == 1
    assert len(client().search_model_versions(f"name='{NAME}'")) == before


def test_a_hyperstyle_checkpoint_without_its_w_encoder_is_one_line_and_registers_nothing(
        imported, store, parity_checkpoint, capsys, monkeypatch):
    """The W encoder neither beside the checkpoint nor in pretrained_models/, a `--w-encoder` file that is not there,
    or one given for another family: exit 2 with one line, before anything is logged (a HyperStyle import that
    succeeds: test_pyfunc.py)."""
    monkeypatch.chdir(store)   # no pretrained_models/ here
    hyperstyle = store / "hyperstyle.pt"   # its layout and opts: the W encoder is looked for before tensors are checked
    torch.save({"state_dict": {"hypernet.conv1.weight": torch.zeros(64, 6, 7, 7)}, "latent_avg": torch.zeros(14, 512),
                "opts": {"encoder_type": "SharedWeightsHyperNetResNet", "output_size": 256, "layers_to_tune": "0,1",
                         "w_encoder_checkpoint_path": "/train/pretrained_models/faces_w_encoder.pt"}}, hyperstyle)
    before = len(client().search_model_versions(f"name='{NAME}'"))
    cases = [([str(hyperstyle)], f"{hyperstyle}: HyperStyle needs its W encoder faces_w_encoder.pt"),
             ([str(hyperstyle), "--w-encoder", "absent.pt"], "absent.pt: HyperStyle's W encoder file not found"),
             ([str(parity_checkpoint), "--w-encoder", str(hyperstyle)], "is given, but this is not a HyperStyle")]
    for argv, message in cases:
        assert main(["import-checkpoint", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("psp import-checkpoint: error:") and message in error, error
        assert len(error.splitlines()) == 1
    assert len(client().search_model_versions(f"name='{NAME}'")) == before


def add_version(evaluation: dict[str, str]) -> str:
    """A new version of the imported model (same artifacts) carrying the given eval_* tags."""
    first = client().get_model_version(NAME, "1")
    version = client().create_model_version(NAME, first.source, run_id=first.run_id)
    for key, value in evaluation.items():
        client().set_model_version_tag(NAME, version.version, key, value)
    return str(version.version)


def alias_version(alias: str) -> str:
    return str(client().get_model_version_by_alias(NAME, alias).version)


def test_promote_by_number_and_by_alias(imported, capsys):
    assert main(["promote", imported, "--to", "staging"]) == 0
    assert alias_version("staging") == imported
    other = add_version({})
    client().set_registered_model_alias(NAME, "candidate", other)
    assert main(["promote", "candidate", "--to", "staging"]) == 0
    assert alias_version("staging") == other
    assert f"@staging -> version {other}" in capsys.readouterr().out

    assert main(["promote", "nosuchalias", "--to", "staging"]) == 2
    assert "no version of psp-encoder has alias nosuchalias" in capsys.readouterr().err


def test_promote_if_better_moves_only_on_improvement(imported, capsys):
    conditions = {"eval_dataset": "abc/test/5/encode", "eval_lpips_backbone": "random"}
    champion = add_version({"eval_lpips": "0.30", "eval_ms_ssim": "0.60", **conditions})
    worse = add_version({"eval_lpips": "0.35", "eval_ms_ssim": "0.70", **conditions})
    better = add_version({"eval_lpips": "0.25", **conditions})
    unevaluated = add_version({})

    assert main(["promote", champion, "--to", "best", "--if-better", "eval_lpips"]) == 0   # no holder yet
    assert alias_version("best") == champion

    assert main(["promote", worse, "--to", "best", "--if-better", "eval_lpips"]) == 0
    assert alias_version("best") == champion
    assert "not moved" in capsys.readouterr().out

    assert main(["promote", worse, "--to", "best", "--if-better", "ms_ssim"]) == 0   # higher is better
    assert alias_version("best") == worse
    client().set_registered_model_alias(NAME, "best", champion)

    assert main(["promote", better, "--to", "best", "--if-better", "eval_lpips"]) == 0
    assert alias_version("best") == better

    capsys.readouterr()
    assert main(["promote", unevaluated, "--to", "best", "--if-better", "eval_lpips"]) == 2
    error = capsys.readouterr().err
    assert f"version {unevaluated} has no eval_lpips" in error and "psp evaluate" in error
    assert alias_version("best") == better

    assert main(["promote", better, "--to", "best", "--if-better", "sharpness"]) == 2
    assert "not an evaluation metric" in capsys.readouterr().err

    elsewhere = add_version({"eval_lpips": "0.01", "eval_dataset": "other/test/5/encode",
                             "eval_lpips_backbone": "random"})
    assert main(["promote", elsewhere, "--to", "best", "--if-better", "eval_lpips"]) == 2
    assert "cannot compare eval_lpips" in capsys.readouterr().err
    assert alias_version("best") == better


@pytest.mark.parametrize("argv, setting, rule", [
    (["--alias", "latest"], "--alias 'latest'", "is reserved"),
    (["--alias", "v7"], "--alias 'v7'", "is reserved"),
    (["--alias", "new champion"], "--alias 'new champion'", "may only contain alphanumerics"),
    (["--name", "bad/name:x"], "--name 'bad/name:x'", "cannot contain '/' or ':'"),
    (["--name", "s3://AKIAEXAMPLE:wJalrSECRET@bucket/x"], "--name 's3://***@bucket/x'", "cannot contain"),
])
def test_a_name_or_alias_mlflow_refuses_is_one_line_before_anything_is_registered(imported, parity_checkpoint,
                                                                                  capsys, argv, setting, rule):
    before = len(client().search_runs([client().get_experiment_by_name("psp-imports").experiment_id]))
    assert main(["import-checkpoint", str(parity_checkpoint), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"psp import-checkpoint: error: {setting}: ") and rule in error
    assert len(error.splitlines()) == 1 and "SECRET" not in error
    assert len(client().search_runs([client().get_experiment_by_name("psp-imports").experiment_id])) == before


def test_promote_to_a_reserved_alias_is_one_line(imported, capsys):
    assert main(["promote", imported, "--to", "latest"]) == 2
    assert capsys.readouterr().err.strip() == ("psp promote: error: --to 'latest': 'latest' alias name "
                                               "(case insensitive) is reserved.")


def test_train_refuses_a_bad_alias_before_reading_data_or_opening_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    (tmp_path / "params.yaml").write_text("train:\n  shards: absent\n")
    assert main(["train", "train.alias=v2"]) == 2
    assert capsys.readouterr().err.strip() == ("psp train: error: train.alias 'v2': Version alias name 'v2' "
                                               "is reserved.")
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow").exists()


def test_values_written_to_mlflow_carry_no_credentials(store, tmp_path):
    """Whatever text reaches MLflow (a job's params and tags, a checkpoint's own opts) goes through the one
    scrubber, and an experiment name holding credentials is refused before anything is stored."""
    secret = "wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY"
    uri = f"s3://AKIA:{secret}@bucket/weights.pt"
    run_id = tracking.record_job("psp-test-jobs", "job", {"model": uri}, {"psp.source": uri}, {}, [])
    run = client().get_run(run_id)
    assert run.data.params["model"] == run.data.tags["psp.source"] == "s3://***@bucket/weights.pt"
    assert tracking.models.opts_params({"checkpoint_path": uri})[0].value == "s3://***@bucket/weights.pt"
    with pytest.raises(InputError, match="holding credentials") as refused:
        tracking.ensure_experiment(uri)
    assert secret not in str(refused.value)
    assert client().get_experiment_by_name(uri) is None
