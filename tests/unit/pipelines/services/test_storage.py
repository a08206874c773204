"""pipelines.services.storage.objects against a real S3-compatible server (SeaweedFS, started by the `s3_server` fixture):
round trips, atomic publishing, access checks, the weights cache, Parquet through an S3 URI."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers import REPO
from helpers.pipelines import wait_until
from pipelines.services import storage, tracking
from psp_core.errors import InputError


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The server's credentials in the standard AWS variables, and no profile files of the machine's user."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def prefix(s3_env) -> str:
    """A folder of its own in the test bucket for each test."""
    return f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:10]}"


def all_keys(uri: str) -> list[str]:
    """Every object under `uri`, hidden ones included (what a reader that lists the bucket would see)."""
    fs, key = storage.Location.of(uri).filesystem()
    infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    return sorted(info.path[len(key) + 1:] for info in infos if info.type == pafs.FileType.File)


def test_local_paths_stay_local(tmp_path):
    assert not storage.is_uri("data/shards") and not storage.is_uri(tmp_path) and not storage.is_uri("file:///x")
    assert storage.is_uri("s3://bucket/key") and storage.is_uri("gs://bucket/key")
    location = storage.Location.of(tmp_path / "out")
    assert location.is_local and location.path == tmp_path / "out"
    assert (location / "a.bin").path == tmp_path / "out" / "a.bin"
    assert storage.Location.of("file:///tmp/x").path == Path("/tmp/x")

    storage.write_bytes_atomic(location / "sub" / "a.bin", b"abc")
    (location.path / ".hidden").write_bytes(b"")
    assert storage.read_bytes(location / "sub" / "a.bin") == b"abc"
    assert storage.list_files(location) == ["sub/a.bin"]
    assert storage.exists(location / "sub") and not storage.exists(location / "missing")
    assert storage.cached_weights(tmp_path / "out" / "sub" / "a.bin") == tmp_path / "out" / "sub" / "a.bin"
    storage.check_access(tmp_path / "anything")


def test_credentials_in_a_uri_are_refused_without_showing_them():
    with pytest.raises(InputError) as err:
        storage.Location.of("s3://AKIDEXAMPLE:verysecret@bucket/key")
    assert "verysecret" not in str(err.value) and "AKIDEXAMPLE" not in str(err.value)
    assert "AWS_ACCESS_KEY_ID" in str(err.value)
    with pytest.raises(InputError, match="credentials and options"):
        storage.Location.of("s3://bucket/key?secret_key=x")


def test_scrub_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID-value")
    text = ("failed: key AKID-value secret s3cr3t-value via http://user:pw@host:9000/x "
            "https://b.s3/k?X-Amz-Credential=AKID%2F1&X-Amz-Signature=abcd")
    scrubbed = storage.scrub(text)
    for secret in ("s3cr3t-value", "AKID-value", "user:pw", "abcd", "AKID%2F1"):
        assert secret not in scrubbed
    assert "http://***@host:9000/x" in scrubbed


def test_round_trip_on_s3(prefix):
    target = storage.Location.of(prefix) / "weights" / "g.pt"
    assert not storage.exists(target)
    storage.write_bytes_atomic(target, b"first")
    storage.write_bytes_atomic(target, b"second version")
    assert storage.read_bytes(target) == b"second version"
    assert storage.exists(target) and storage.exists(target.parent)
    storage.write_bytes_atomic(storage.Location.of(prefix) / "a.txt", b"a")
    assert storage.list_files(prefix) == ["a.txt", "weights/g.pt"]
    assert all_keys(prefix) == ["a.txt", "weights/g.pt"]          # no temporary key left behind
    with storage.open_input_file(target) as handle:
        handle.seek(7)
        assert handle.read() == b"version"
    storage.delete_file(target)
    assert storage.list_files(prefix) == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(target)


def test_endpoint_and_credentials_from_the_aws_profile_files(prefix, s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name)
    (tmp_path / "config").write_text(f"[profile psp]\nregion = us-east-1\nendpoint_url = {s3_env.endpoint}\n")
    (tmp_path / "credentials").write_text(f"[psp]\naws_access_key_id = {s3_env.access_key}\n"
                                          f"aws_secret_access_key = {s3_env.secret_key}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "psp")
    storage.check_access(f"{prefix}/profile", write=True)
    storage.write_bytes_atomic(f"{prefix}/profile/a.txt", b"via the profile")
    assert storage.read_bytes(f"{prefix}/profile/a.txt") == b"via the profile"


def test_failed_write_leaves_no_object(prefix):
    target = storage.Location.of(prefix) / "half.bin"
    storage.write_bytes_atomic(target, b"complete old version")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_output(target) as out:
            out.write(b"x" * (6 << 20))
            raise RuntimeError("killed half-way")
    assert storage.read_bytes(target) == b"complete old version"
    assert all_keys(prefix) == ["half.bin"]


def test_an_object_being_replaced_is_read_whole(prefix):
    target = f"{prefix}/manifest.json"
    versions = [b"short version", b"x" * 5000]
    storage.write_bytes_atomic(target, versions[0])
    reads: list[bytes] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                reads.append(storage.read_bytes(target))
            except BaseException as err:  # reported by the test thread
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            storage.write_bytes_atomic(target, versions[i % 2 == 0])
            time.sleep(0.005)  # a writer that never pauses would starve any reader; a real one pauses
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert len(reads) > 10 and all(data in versions for data in reads), {len(data) for data in reads}


def read_published(folder: str) -> dict[str, bytes]:
    """What a reader that trusts only the manifest sees: each listed file, checked against its sha256."""
    manifest = json.loads(storage.read_bytes(storage.Location.of(folder) / "manifest.json"))
    seen = {}
    for entry in manifest["files"]:
        data = storage.read_bytes(storage.Location.of(folder) / entry["file"])
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry
        seen[entry["name"]] = data
    return seen


def publish(folder: str, contents: dict[str, bytes], fail: bool = False, chunks: int = 1) -> None:
    """Write `contents` through published_folder (in `chunks` writes per file), the manifest last."""
    with storage.published_folder(folder, "manifest.json") as writer:
        for name, data in contents.items():
            with writer.open(name) as out:
                for part in np.array_split(np.frombuffer(data, np.uint8), chunks):
                    out.write(part.tobytes())
        if fail:
            raise RuntimeError("stage failed before its manifest")
        writer.publish({"files": [{"name": name, **vars(written)} for name, written in zip(contents, writer.files)]})


def test_published_folder_readers_see_whole_versions(prefix):
    folder = f"{prefix}/shards"
    rng = np.random.default_rng(0)
    v1 = {f"part-{i}.bin": rng.bytes(200_000) for i in range(3)}
    v2 = {f"part-{i}.bin": rng.bytes(300_000) for i in range(4)}
    publish(folder, v1)
    assert read_published(folder) == v1

    seen: list[dict[str, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(read_published(folder))
            except FileNotFoundError:      # a newer version replaced the one whose manifest it read: reread
                continue
            except BaseException as err:  # reported by the test thread
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in (v2, v1, v2, v1, v2):                      # the manifest changes size each time
            publish(folder, version, chunks=8)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert len(seen) > 5 and all(version in (v1, v2) for version in seen)
    assert read_published(folder) == v2
    assert_failed_run_keeps_the_published_version(folder, v2)


def test_published_folder_on_a_local_path(tmp_path):
    folder = str(tmp_path / "shards")
    publish(folder, {"a.bin": b"one"})
    publish(folder, {"a.bin": b"two", "b.bin": b"three"})
    assert read_published(folder) == {"a.bin": b"two", "b.bin": b"three"}
    assert sorted(os.listdir(folder)) == ["a.bin", "b.bin", "manifest.json"]     # the local layout is unchanged
    assert_failed_run_keeps_the_published_version(folder, {"a.bin": b"two", "b.bin": b"three"})


def assert_failed_run_keeps_the_published_version(folder: str, published: dict[str, bytes]) -> None:
    with pytest.raises(RuntimeError, match="before its manifest"):
        publish(folder, {"a.bin": b"never published"}, fail=True)
    assert read_published(folder) == published
    listed = {entry["file"] for entry in json.loads(storage.read_bytes(f"{folder}/manifest.json"))["files"]}
    assert set(storage.list_files(folder)) == listed | {"manifest.json"}   # old generation and failed run gone


def test_published_folder_refuses_someone_elses_folder(prefix):
    storage.write_bytes_atomic(f"{prefix}/theirs/notes.txt", b"not ours")
    with pytest.raises(InputError, match="no manifest.json"):
        with storage.published_folder(f"{prefix}/theirs", "manifest.json"):
            pass
    assert storage.read_bytes(f"{prefix}/theirs/notes.txt") == b"not ours"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_claimed_folder_follows_the_output_folder_rules(where, request, tmp_path):
    root = request.getfixturevalue("prefix") if where == "s3" else str(tmp_path)
    with storage.claimed_folder(f"{root}/latents", "invert") as folder:
        storage.write_bytes_atomic(folder / "part-0.parquet", b"rows")
    with storage.claimed_folder(f"{root}/latents", "invert") as folder:              # reused by its stage
        assert storage.list_files(folder) == ["part-0.parquet"]
    with pytest.raises(InputError, match="output folder of `psp invert`"):
        with storage.claimed_folder(f"{root}/latents", "edit"):
            pass
    storage.write_bytes_atomic(f"{root}/photos/mine.jpg", b"jpeg")
    with pytest.raises(InputError, match="not empty and is not an output folder"):
        with storage.claimed_folder(f"{root}/photos", "invert"):
            pass
    with pytest.raises(RuntimeError):
        with storage.claimed_folder(f"{root}/fresh", "invert"):
            raise RuntimeError("failed before writing anything")
    assert not storage.exists(f"{root}/fresh/{storage.OUTPUT_MARKER}")


def assert_one_line_fast(call, started: float, limit_s: float, *, names: str, says: str, secret: str) -> None:
    with pytest.raises(InputError) as err:
        call()
    message = str(err.value)
    assert time.monotonic() - started < limit_s, message
    assert "\n" not in message and names in message and says in message, message
    assert secret not in message


def test_check_access_passes_for_a_usable_location(prefix):
    storage.write_bytes_atomic(f"{prefix}/in/weights.pt", b"w")
    storage.check_access(f"{prefix}/in/weights.pt")
    storage.check_access(f"{prefix}/in")
    storage.check_access(f"{prefix}/out", write=True)
    storage.check_access(f"{prefix}/in/weights.pt", write=True)
    assert all_keys(prefix) == ["in/weights.pt"]                 # the write probe is gone


def test_check_access_wrong_secret_key(prefix, monkeypatch, s3_env):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    for write in (False, True):
        assert_one_line_fast(lambda: storage.check_access(f"{prefix}/in", write=write), time.monotonic(), 5,
                             names=f"{prefix}/in", says="access denied", secret="wrong-secret-value")
    assert s3_env.secret_key not in "wrong-secret-value"


def test_check_access_missing_bucket_and_missing_input(s3_env, prefix):
    assert_one_line_fast(lambda: storage.check_access("s3://no-such-bucket/shards"), time.monotonic(), 5,
                         names="s3://no-such-bucket/shards", says="bucket 'no-such-bucket' does not exist",
                         secret=s3_env.secret_key)
    assert_one_line_fast(lambda: storage.check_access("s3://no-such-bucket/out", write=True), time.monotonic(), 5,
                         names="s3://no-such-bucket/out", says="does not exist", secret=s3_env.secret_key)
    assert_one_line_fast(lambda: storage.check_access(f"{prefix}/missing"), time.monotonic(), 5,
                         names=f"{prefix}/missing", says="no such file or folder", secret=s3_env.secret_key)


def test_check_access_unreachable_endpoint(s3_env, prefix, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{refused_port}")
    assert_one_line_fast(lambda: storage.check_access(f"{prefix}/in"), time.monotonic(), 5,
                         names=f"{prefix}/in", says=f"endpoint http://127.0.0.1:{refused_port} unreachable",
                         secret=s3_env.secret_key)
    with socket.socket() as silent:                             # accepts no connection, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        limit = 2 * storage.CHECK_TIMEOUT_S + 1
        assert_one_line_fast(lambda: storage.check_access(f"{prefix}/in"), time.monotonic(), limit,
                             names=f"{prefix}/in", says="unreachable", secret=s3_env.secret_key)


FETCH_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipelines.services.storage import cached_weights
    go = Path(sys.argv[3])
    Path(sys.argv[4]).touch()                                    # ready: imported, about to wait
    while not go.exists():
        time.sleep(0.01)
    print(cached_weights(sys.argv[1], cache_dir=Path(sys.argv[2])))
""")


def fetch_in_processes(uri: str, cache: Path, count: int, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """`count` processes that call cached_weights(uri) at the same moment (they wait for a start file)."""
    token = uuid.uuid4().hex[:6]
    go, ready = cache.parent / f"go-{token}", [cache.parent / f"ready-{token}-{i}" for i in range(count)]
    processes = [subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, uri, str(cache), str(go), str(ready[i])],
                                  cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for i in range(count)]
    for process in processes:                                    # every one has imported and waits: start them
        wait_until(lambda: all(r.exists() for r in ready), process, 60, "the fetching processes", every=0.01)
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_cached_weights_fetches_once_per_node(prefix, tmp_path, s3_env):
    data = np.random.default_rng(1).bytes(12 << 20)
    uri = f"{prefix}/pretrained/stylegan2.pt"
    storage.write_bytes_atomic(uri, data)
    cache = tmp_path / "cache"
    results = fetch_in_processes(uri, cache, 2, s3_env.env())
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    paths = {r.stdout.strip() for r in results}
    logs = "".join(r.stderr for r in results)
    assert len(paths) == 1 and logs.count("fetching") == 1 and logs.count("using the cached copy") == 1, logs
    cached = Path(paths.pop())
    digest = hashlib.sha256(data).hexdigest()
    assert cached == cache / "sha256" / digest / "stylegan2.pt" and cached.read_bytes() == data
    assert s3_env.secret_key not in logs
    assert storage.cached_weights(uri, sha256=digest, cache_dir=cache) == cached

    cached.write_bytes(b"damaged" + data[7:])                     # same size, other bytes
    assert storage.cached_weights(uri, cache_dir=cache).read_bytes() == data

    storage.write_bytes_atomic(uri, b"retrained generator")       # the source changed: fetched again
    changed = storage.cached_weights(uri, cache_dir=cache)
    assert changed.read_bytes() == b"retrained generator" and changed.parent.name != digest
    with pytest.raises(InputError, match="expected sha256"):
        storage.cached_weights(uri, sha256=digest, cache_dir=cache)
    with pytest.raises(InputError, match="no such file"):
        storage.cached_weights(f"{prefix}/pretrained/missing.pt", cache_dir=cache)


def test_cached_weights_from_an_mlflow_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.use_tracking_store()          # this test's store, as every `psp` process selects it
    weights = tmp_path / "ir_se50.pth"
    weights.write_bytes(b"irse50 weights")
    experiment = mlflow.create_experiment("weights", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(weights), artifact_path="pretrained")
    uri = f"runs:/{run.info.run_id}/pretrained/ir_se50.pth"
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="pipelines.services.storage.cache"):
        first = tracking.fetch_weights(uri, cache_dir=cache)
        second = tracking.fetch_weights(uri, cache_dir=cache)
    assert first == second == cache / "sha256" / hashlib.sha256(b"irse50 weights").hexdigest() / "ir_se50.pth"
    assert first.read_bytes() == b"irse50 weights"
    assert caplog.text.count("fetching") == 1 and caplog.text.count("using the cached copy") == 1


def test_parquet_through_an_s3_uri(prefix):
    table = pa.table({"id": [f"row{i}" for i in range(250)], "image": [bytes([i % 256]) * 100 for i in range(250)]})
    with storage.published_folder(f"{prefix}/shards", "manifest.json") as writer:
        with writer.open("shard-00000.parquet") as out:
            pq.write_table(table, out, row_group_size=100)
        writer.publish({"shards": [vars(written) for written in writer.files]})
    entry = json.loads(storage.read_bytes(f"{prefix}/shards/manifest.json"))["shards"][0]
    shard = storage.Location.of(prefix) / "shards" / entry["file"]
    assert hashlib.sha256(storage.read_bytes(shard)).hexdigest() == entry["sha256"]

    with storage.open_input_file(shard) as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_row_groups == 3
        assert parquet.read_row_group(2).column("id").to_pylist() == [f"row{i}" for i in range(200, 250)]
    fs, key = shard.filesystem()
    assert pq.read_table(key, filesystem=fs).equals(table)


def test_torch_checkpoint_through_an_s3_uri(prefix):
    import torch

    state = {"encoder.weight": torch.arange(12.0).reshape(3, 4), "latent_avg": torch.ones(18, 512)}
    with storage.atomic_output(f"{prefix}/checkpoints/last.pt") as out:
        torch.save(state, out)
    with storage.open_input_file(f"{prefix}/checkpoints/last.pt") as handle:
        loaded = torch.load(handle, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_only_temporary_files_with_the_stages_token_are_removed(tmp_path):
    """A killed write leaves `.<name>.psp-partial-<random>.tmp`; a user's `.x.tmp` of any other shape stays."""
    with storage.atomic_path(tmp_path / "a.png") as tmp:
        assert tmp.name.startswith(storage.temporary_prefix("a.png")) and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"png")
    top = tmp_path / f"{storage.temporary_prefix('b.png')}k3x9q2.tmp"
    below = tmp_path / "sub" / f"{storage.temporary_prefix('c.parquet')}abc_12.tmp"
    foreign = [".backup.tmp", ".a.png.abc.tmp", ".a.png.psp-partial.tmp", "a.png.psp-partial-abc.tmp",
               ".a.png.psp-partial-abc.tmpx", "sub/.draft.tmp", "sub/mine/.x.tmp"]
    for path in [top, below, *(tmp_path / name for name in foreign)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("written")
    folder = tmp_path / "sub" / "mine" / f"{storage.temporary_prefix('d')}xyz.tmp"
    folder.mkdir()   # only files are removed

    assert storage.remove_own_temporaries(tmp_path) == 1 and not top.exists() and below.exists()
    assert storage.remove_own_temporaries(tmp_path, recursive=True) == 1 and not below.exists()
    assert all((tmp_path / name).is_file() for name in foreign) and folder.is_dir()
    assert (tmp_path / "a.png").read_bytes() == b"png"
