"""`psp train`'s driver before Ray starts: a generator file that does not fit the architecture the params build is
one line and exit 2, before any MLflow run (the real Ray runs: tests/e2e/test_train_ray.py)."""
from __future__ import annotations

import pytest
import ray
import yaml

from helpers.ada import ada_generator, write_network_pickle
from helpers.pipelines import TINY_TRAIN, make_shards
from pipelines.cli import main
from pipelines.params.schema import TrainConfig
from pipelines.services.storage import StageInput
from pipelines.stages.train import check_generator, objective_description, run_name_for, weights_used
from psp_core.data.presets import get_preset
from psp_core.options import HYPERSTYLE


@pytest.fixture(scope="module")
def half_width_pickle(tmp_path_factory):
    """A StyleGAN2-ADA snapshot of channel_base 16384 (channel multiplier 1), 64 px."""
    return write_network_pickle(tmp_path_factory.mktemp("ada") / "network-snapshot-000100.pkl",
                                ada_generator(resolution=64, channel_base=16384, seed=1))


def test_a_generator_of_another_channel_multiplier_is_one_line_before_mlflow(tmp_path, half_width_pickle, monkeypatch,
                                                                             capsys):
    make_shards(tmp_path, images=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {
        **TINY_TRAIN, "shards": "shards", "output_size": 64, "generator": str(half_width_pickle)}}))
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"psp train: error: {half_width_pickle}: generator has channel multiplier 1 (StyleGAN2-ADA "
                         "channel_base 16384), the model wants stylegan_channel_multiplier=2")
    assert not (tmp_path / "mlflow").exists() and not ray.is_initialized()

    assert main(["train", "train.output_size=32"]) == 2   # the size is checked the same way
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "generator outputs 64px, the model wants output_size=32")


def test_the_channel_multiplier_is_a_train_setting_the_check_accepts(half_width_pickle):
    cfg = TrainConfig(**{**TINY_TRAIN, "output_size": 64, "generator": str(half_width_pickle),
                         "stylegan_channel_multiplier": 1})
    preset = get_preset(cfg.preset)
    assert cfg.architecture(preset.input_nc).stylegan_channel_multiplier == 1
    check_generator(cfg, preset)   # fits: no error
    with pytest.raises(Exception, match="stylegan_channel_multiplier must be in 1..4"):
        TrainConfig(stylegan_channel_multiplier=5).architecture(3)


def test_hyperstyle_without_its_w_encoder_or_at_a_size_it_has_not_is_one_line_before_mlflow(tmp_path, monkeypatch,
                                                                                           capsys):
    """hyperstyle_encode refines a trained W encoder's codes: no W encoder file is one line naming the setting, and
    an input size no hypernetwork has and HyperStyle's encoder types are asked for by name; nothing starts."""
    make_shards(tmp_path, images=8)
    hyperstyle = {"preset": "hyperstyle_encode", "encoder_type": "SharedWeightsHyperNetResNet", "output_size": 256,
                  "encoder_input_size": 256, "train_decoder": False, "w_encoder": "missing_w_encoder.pt"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "shards": "shards", **hyperstyle}}))
    monkeypatch.chdir(tmp_path)
    cases = [([], "preset hyperstyle_encode refines the codes of a trained W encoder, and there is none at "
                  f"{tmp_path / 'missing_w_encoder.pt'}: set train.w_encoder"),
             (["train.encoder_input_size=48"], "encoder_input_size must be a power of two in 32..1024, got 48"),
             (["train.encoder_type=GradualStyleEncoder"], "unknown HyperStyle encoder_type 'GradualStyleEncoder'")]
    for overrides, message in cases:
        assert main(["train", *overrides]) == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and message in error.strip().splitlines()[-1], error
    assert not (tmp_path / "mlflow").exists() and not ray.is_initialized()


def test_w_encode_trains_a_w_encoder_the_e4e_way_and_asks_for_its_encoder_type(tmp_path, monkeypatch, capsys):
    """preset w_encode builds a W encoder (family w_encoder), described as e4e's objective with one code; another
    encoder type is one line naming the one to set, before anything starts."""
    cfg = TrainConfig(**{**TINY_TRAIN, "preset": "w_encode", "encoder_type": "WEncoder"})
    preset = get_preset(cfg.preset)
    assert cfg.architecture(preset.input_nc).family == "w_encoder"
    assert objective_description(cfg, preset) == (
        "Objective: e4e's with one code for every style (l2_lambda 1, lpips_lambda 0.8, id_lambda 0.5, "
        "w_discriminator_lambda 0.1; latent discriminator (lr 2e-05, R1 10 every 16 steps, code pools of 50)).")
    make_shards(tmp_path, images=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "shards": "shards",
                                                                    "preset": "w_encode"}}))
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "WEncoder" in error.strip().splitlines()[-1], error
    assert not (tmp_path / "mlflow").exists() and not ray.is_initialized()


def test_a_weights_file_replaced_at_its_path_names_a_new_run(tmp_path):
    """The automatic run name hashes the starting weights' bytes as well as the params and data: a rerun with the
    same files resumes its run, while a W encoder replaced under the same name starts a new one (resuming would
    freeze the new W encoder under a hypernetwork trained against the old)."""
    manifest = StageInput.of(str(make_shards(tmp_path, images=8))).shards()
    w_encoder = tmp_path / "faces_w_encoder.pt"
    w_encoder.write_bytes(b"one W encoder")
    cfg = TrainConfig(**{**TINY_TRAIN, "preset": "hyperstyle_encode", "encoder_type": "SharedWeightsHyperNetResNet",
                         "output_size": 256, "encoder_input_size": 256, "w_encoder": str(w_encoder)})
    first = run_name_for(cfg, manifest, weights_used(cfg, HYPERSTYLE))
    assert first.startswith("hyperstyle_encode-")
    assert run_name_for(cfg, manifest, weights_used(cfg, HYPERSTYLE)) == first
    w_encoder.write_bytes(b"another W encoder")
    assert run_name_for(cfg, manifest, weights_used(cfg, HYPERSTYLE)) != first
    named = cfg.model_copy(update={"run_name": "my-run"})
    assert run_name_for(named, manifest, weights_used(named, HYPERSTYLE)) == "my-run"
