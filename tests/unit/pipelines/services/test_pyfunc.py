"""The registered MLflow pyfunc model: both image layouts, the `n_iters` / `return_images` params, a HyperStyle
version carrying its W encoder, and the model served by a real `mlflow models serve` process answering an HTTP
request."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.hyperstyle import W_ENCODER_NAME, write_hyperstyle
from helpers.pipelines import clean_env, free_port
from helpers.tracking import tracking_store
from pipelines.cli import main
from pipelines.services import tracking
from pipelines.services.storage import file_digest
from pipelines.services.tracking.pyfunc import PSPEncoderModel
from psp_core import PSP, PSPArchitecture, refine, save_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.errors import InputError
from psp_core.inference import InferenceModel, scored
from psp_core.options import MAX_REFINE_ITERS

NAME = "restyle-encoder"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny ReStyle-pSp checkpoint (random weights) imported as version 1 into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("pyfunc")
    with tracking_store(root) as uri:
        torch.manual_seed(0)
        net = PSP(PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6,
                                  output_size=16, encoder_input_size=32))
        net.set_latent_avg(0.1 * torch.randn(net.n_styles, 512))
        checkpoint = save_psp(net.eval(), root / "restyle.pt")
        tracking.import_checkpoint(checkpoint, NAME)
        yield root, uri, net


def expected(net: PSP, pixels: np.ndarray, n_iters: int) -> tuple[np.ndarray, np.ndarray]:
    """ReStyle's answer computed here: the evaluation transform, then `refine`'s last step."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    source, _ = PresetTransform(get_preset("encode"), 32, train=False)(images, images, torch.Generator())
    with torch.no_grad():
        output, latents = refine(net, source, n_iters)[-1]
    return latents.numpy(), torch.nn.functional.adaptive_avg_pool2d(output, 256).clamp(-1, 1).numpy()


def test_pyfunc_takes_pixels_and_floats_and_params(registered):
    _, uri, net = registered
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)

    latents = model.predict(pixels, params={"n_iters": 2})
    want, want_images = expected(net, pixels, 2)
    assert latents.shape == (2, net.n_styles, 512)
    np.testing.assert_allclose(latents, want, rtol=0, atol=1e-5)
    assert not np.allclose(model.predict(pixels, params={"n_iters": 1}), want, atol=1e-3), "n_iters is ignored"

    both = model.predict(pixels, params={"n_iters": 2, "return_images": True})
    np.testing.assert_allclose(both["latents"], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(both["images"], want_images, rtol=0, atol=1e-5)

    floats = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1   # the same images, [N, 3, H, W] in [-1, 1]
    np.testing.assert_allclose(model.predict(floats, params={"n_iters": 2}), want, rtol=0, atol=1e-4)

    with pytest.raises(InputError, match=r"pixels \[N, H, W, 3\] in 0..255"):
        model.predict(np.full((1, 8, 8, 3), 300, dtype=np.int64))
    with pytest.raises(InputError, match=r"\[N, 3, H, W\]"):
        model.predict(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_non_finite_pixels_and_iteration_counts_outside_the_clis_bounds_are_refused(registered):
    """NaN / Inf images gave NaN codes, `n_iters: 0` ran as 5 and 100 was accepted: the CLI's bounds (1..20)."""
    _, _, net = registered
    model = PSPEncoderModel()
    model.model = InferenceModel(net, "encode")
    floats = np.zeros((1, 3, 8, 8), dtype=np.float32)
    for value in (np.nan, np.inf, -np.inf):
        floats[0, 0, 0, 0] = value
        with pytest.raises(InputError, match=r"float images must be finite"):
            model.predict(None, floats)
    pixels = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    for n_iters in (0, -1, 21, 100, True, 2.5, "3"):
        with pytest.raises(InputError, match=r"n_iters must be an integer in 1\.\.20"):
            model.predict(None, pixels, params={"n_iters": n_iters})
    assert model.predict(None, pixels, params={"n_iters": 20}).shape == (1, net.n_styles, 512)


@pytest.fixture(scope="module")
def registered_hyperstyle(tmp_path_factory):
    """The small HyperStyle checkpoint imported by `psp import-checkpoint --w-encoder` into a fresh store, its W
    encoder given under another name than the opts' (with a weights cache of its own: the files weigh ~0.9 GB)."""
    root = tmp_path_factory.mktemp("hyperstyle")
    checkpoint, w_encoder = write_hyperstyle(root / "released")
    w_encoder = w_encoder.rename(root / "my_w_encoder.pt")
    with tracking_store(root) as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert main(["import-checkpoint", str(checkpoint), "--name", "hyperstyle", "--w-encoder", str(w_encoder)]) == 0
        yield uri, checkpoint, w_encoder


def test_a_hyperstyle_version_carries_both_files_and_serves_its_iterations(registered_hyperstyle):
    """The version holds the checkpoint and, beside it under the name its opts give, the W encoder (its hash in the
    source tag too); the served model computes what the inference core computes from those files, step `n_iters`."""
    uri, checkpoint, w_encoder = registered_hyperstyle
    resolved = tracking.resolve_model("models:/hyperstyle/1")
    stored = {p.name: file_digest(p) for p in resolved.checkpoint.parent.iterdir()}
    assert resolved.checkpoint.name == "hyperstyle.pt"
    assert stored == {"hyperstyle.pt": file_digest(checkpoint), W_ENCODER_NAME: file_digest(w_encoder)}
    run = tracking.client().get_run(resolved.version.run_id)
    assert run.data.tags[tracking.SOURCE_TAG].endswith(f"+ W encoder my_w_encoder.pt sha256:{file_digest(w_encoder)}")

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pyfunc.load_model("models:/hyperstyle/1")
    pixels = np.random.default_rng(0).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    answer = served.predict(pixels, params={"n_iters": 2, "return_images": True})
    core = InferenceModel.load(checkpoint, device="cpu", w_encoder=w_encoder)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    steps = core.invert(core.prepare(images, images)[0], 2)
    np.testing.assert_allclose(answer["latents"], steps[-1].latents.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(answer["images"], scored(steps[-1].images).numpy(), rtol=0, atol=1e-4)
    assert (scored(steps[0].images) - scored(steps[1].images)).abs().max() > 1e-3, "step 2 alone proves n_iters"
    with pytest.raises(InputError, match=rf"n_iters must be an integer in 1\.\.{MAX_REFINE_ITERS}"):
        served.predict(pixels, params={"n_iters": MAX_REFINE_ITERS + 1})


@pytest.mark.slow
def test_served_model_answers_a_request(registered):
    root, uri, net = registered
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)   # the server runs `uvicorn` from the environment's PATH
    env = clean_env(MLFLOW_TRACKING_URI=uri, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    mlflow_cli = str(Path(venv_bin) / "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "serve.log", "w"),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the model server did not start:\n" + (root / "serve.log").read_text()[-3000:]
            time.sleep(1)
        pixels = np.random.default_rng(1).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
        body = json.dumps({"inputs": pixels.tolist(), "params": {"n_iters": 3}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)
        want, _ = expected(net, pixels, 3)
        np.testing.assert_allclose(predictions, want, rtol=0, atol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
