"""The data path on a real photo archive: no user file touched, every entry accounted for, clean
stops on real signals, one-line errors for user mistakes (exit 2), help from the schema, honest splits."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
import yaml
from PIL import Image

from helpers.pipelines import PSP as PSP_CLI
from helpers.pipelines import interruptible, make_shards, wait_until
from pipelines.cli import COMMANDS, main
from pipelines.params.loading import ConfigError, load_section
from pipelines.params.schema import SECTIONS, AlignConfig, ShardConfig, TrainConfig
from pipelines.stages.align import align_folder, photo_name
from pipelines.stages.shard import write_shards
from psp_core import PSPArchitecture, TrainingConfig, build_psp, save_psp
from psp_core.data.align import load_photo, to_rgb
from psp_core.data.shards import printable_path, read_manifest
from psp_core.nets.psp import PSP

ASTRONAUT = Image.fromarray(skimage.data.astronaut())


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def psp(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console script in a subprocess."""
    return subprocess.run([PSP_CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """Assert exit 2 and exactly one stderr line `psp COMMAND: error: ...`; return it."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"psp {command}: error: "), result.stderr
    return lines[0]


def read_rejects(folder: Path) -> dict[str, list[str]]:
    with open(folder / "rejects.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["path"], []).append(row["reason"])
    return found


def align(input_dir: Path, output_dir: Path, **options) -> dict:
    return align_folder(AlignConfig(input_dir=str(input_dir), output_dir=str(output_dir),
                                    report=str(output_dir.parent / f"{output_dir.name}.json"),
                                    output_size=64, workers=1, **options))


# ----------------------------------------------------------------------------- no data loss

USER_FILES = {"scan-20240101.png": b"scan", "holiday-deadbeef-f1.png": b"holiday", "keep.png": b"keep"}


def test_align_refuses_a_folder_of_someone_elses_files(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(ASTRONAUT))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name, data in USER_FILES.items():
        (theirs / name).write_bytes(data)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"align": {"input_dir": str(photos), "output_dir": str(theirs),
                                                "report": str(tmp_path / "align.json"), "workers": 1}}))
    line = one_line_error(psp("align", "--params", str(params), cwd=tmp_path), "align")
    assert "not an output folder of `psp align`" in line and str(theirs) in line
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == USER_FILES


def test_align_removes_only_files_its_records_list(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_bytes(jpeg(ASTRONAUT, quality=80 + len(name) + ord(name[0]) % 7))
    out = tmp_path / "aligned"
    align(photos, out)
    made_for_b = f"{photo_name('b.jpg')}-f0.png"
    assert (out / made_for_b).is_file()

    # The user drops files into the stage's folder, one named exactly like a future output.
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)
    clash = f"{photo_name('c.jpg')}-f0.png"
    (out / clash).write_bytes(b"mine")
    (photos / "b.jpg").unlink()                                   # b's outputs are now stale: ours to remove
    (photos / "c.jpg").write_bytes(jpeg(ASTRONAUT, quality=70))   # c would write over the user's file
    report = align(photos, out)

    assert not (out / made_for_b).exists()
    assert {name: (out / name).read_bytes() for name in USER_FILES} == USER_FILES
    assert (out / clash).read_bytes() == b"mine"
    assert read_rejects(out)["c.jpg"] == ["output_exists"]
    assert report["reject_reasons"] == {"output_exists": 1}


# ----------------------------------------------------------------------------- every entry accounted for

@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A folder with a latin-1 file name, links, a pipe, a socket, hidden files and an exact duplicate."""
    folder = tmp_path_factory.mktemp("archive")
    face = jpeg(ASTRONAUT)
    (folder / "a.jpg").write_bytes(face)
    (folder / "copy of a.jpg").write_bytes(face)
    os.makedirs(folder / "people", exist_ok=True)
    (folder / "people" / "grey.png").write_bytes(jpeg(ASTRONAUT.convert("L"), 85))
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    with open(latin1, "wb") as handle:
        handle.write(jpeg(ASTRONAUT, 75))
    (folder / ".hidden.jpg").write_bytes(face)
    (folder / ".git").mkdir()
    (folder / ".git" / "x.jpg").write_bytes(face)
    os.symlink(folder / "nowhere.jpg", folder / "gone.jpg")
    os.symlink(folder / "a.jpg", folder / "link_to_a.jpg")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "far.jpg").write_bytes(face)
    os.symlink(elsewhere, folder / "linked_folder")
    os.mkfifo(folder / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    server.close()
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_every_entry_is_a_row_or_a_counted_skip_and_the_stage_never_blocks(archive, tmp_path):
    out = tmp_path / "aligned"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"align": {"input_dir": str(archive), "output_dir": str(out),
                                                "report": str(tmp_path / "align.json"), "output_size": 64,
                                                "workers": 1}}))
    result = psp("align", "--params", str(params), cwd=tmp_path, timeout=120)   # a FIFO read would hang here
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "align.json").read_text())
    rejects = read_rejects(out)
    index = pq.read_table(out / "index.parquet").to_pylist()

    assert {row["source_path"] for row in index} == {"a.jpg", "caf\\xe9.jpg", "people/grey.png"}
    assert rejects == {
        "copy of a.jpg": ["duplicate"], "link_to_a.jpg": ["duplicate"], ".hidden.jpg": ["hidden"],
        "gone.jpg": ["broken_link"], "linked_folder": ["symlinked_folder"], "pipe.jpg": ["not_regular_file"],
        "sock.png": ["not_regular_file"],
    }
    assert report["skipped"] == {"broken_link": 1, "hidden": 2, "not_regular_file": 2, "symlinked_folder": 1}
    assert report["duplicates"] == 2 and report["other_files_ignored"] == 1
    assert report["photos"] == 5 and report["faces_aligned"] == 3   # a link to a file is that file: a duplicate

    # The shard manifest names source photos; the latin-1 name is one row like any other.
    shards = tmp_path / "shards"
    write_shards(ShardConfig(input_dir=str(out), output_dir=str(shards), report=str(tmp_path / "shard.json"),
                             test_fraction=0.0))
    rows = pq.read_table(next(shards.glob("*.parquet")), columns=["source_path"]).column("source_path").to_pylist()
    assert sorted(rows) == ["a.jpg", "caf\\xe9.jpg", "people/grey.png"]


def test_a_name_that_is_not_utf8_is_stored_as_a_printable_escape():
    assert printable_path(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert printable_path("café.jpg") == "café.jpg"
    assert photo_name(os.fsdecode(b"caf\xe9.jpg")) != photo_name(os.fsdecode(b"caf\xe8.jpg"))


# ----------------------------------------------------------------------------- Pillow, thresholds, 32-bit

def test_max_pixels_above_pillows_own_limit_is_honoured():
    side = 13_400   # 179.6 Mpx: more than twice Pillow's default limit, where Pillow itself refuses
    assert side * side > 2 * 89_478_485
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    buffer.seek(0)
    photo = load_photo(buffer, max_pixels=200_000_000)
    assert photo.size == (side, side)


@pytest.mark.parametrize("value", [".nan", "5", "-2"])
def test_threshold_must_be_a_real_detector_score(tmp_path, value):
    params = tmp_path / "params.yaml"
    params.write_text("align:\n  workers: 1\n")
    with pytest.raises(ConfigError, match=r"^align\.threshold: "):
        load_section("align", AlignConfig, [f"threshold={value}"], params)


def test_32_bit_integer_images_are_scaled_by_their_real_range():
    values = np.linspace(0, 4_000_000, 64 * 64, dtype=np.int32).reshape(64, 64)
    image = Image.fromarray(values, mode="I")
    gray = np.asarray(to_rgb(image))[..., 0].astype(float)
    assert gray.min() == 0 and gray.max() == 255
    np.testing.assert_allclose(gray, np.rint(values / 4_000_000 * 255), atol=1)


def test_pillow_warnings_are_logged_with_the_file_name_not_printed(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (90, 90, 90)).save(photos / "big.png")   # 1600 px over a 1000 px limit
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"align": {"input_dir": str(photos), "output_dir": str(tmp_path / "out"),
                                                "report": str(tmp_path / "r.json"), "max_pixels": 1000,
                                                "workers": 1}}))
    result = psp("align", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "WARNING psp_core.data.align: big.png: Image size (1600 pixels) exceeds limit" in result.stderr
    assert "DecompressionBombWarning" not in result.stderr and "warnings.warn" not in result.stderr
    assert read_rejects(tmp_path / "out") == {"big.png": ["too_large"]}


# ----------------------------------------------------------------------------- clean stops

@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    large = ASTRONAUT.resize((1400, 1400), Image.Resampling.BICUBIC)   # ~0.3 s each: time to stop it midway
    for number in range(40):
        angle = (number % 9) - 4
        (folder / f"p{number:02d}.jpg").write_bytes(jpeg(large.rotate(angle, fillcolor=(120, 120, 120)), 55 + number))
    return folder


def finished_records(out: Path) -> int:
    """Photos align has finished (a pending record: a photo stopped between its images and its record)."""
    count = 0
    for path in (out / ".records").glob("*.json"):
        try:
            count += not json.loads(path.read_text()).get("pending")
        except (OSError, ValueError):
            pass
    return count


def start_align(params: Path, out: Path, tmp_path: Path, already: int) -> subprocess.Popen:
    """`psp align` on the 40 photos, returned once it has finished three more than `already`."""
    process = subprocess.Popen([PSP_CLI, "align", "--params", str(params)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    wait_until(lambda: finished_records(out) >= already + 3, process, 120, "three more aligned photos", every=0.05)
    return process


@pytest.mark.slow
def test_a_stopped_align_leaves_no_worker_and_a_rerun_finishes_the_rest(many_photos, tmp_path):
    """Ctrl-C, SIGTERM and SIGKILL, each on a rerun of the one before: each stop is prompt, leaves no worker and
    keeps what is done (Ctrl-C and SIGTERM with the stage's one line and exit 130 / 143); each rerun counts what is
    already aligned and does the rest, and the last finishes every photo. (Three tests once, one run each.)"""
    out = tmp_path / "aligned"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"align": {"input_dir": str(many_photos), "output_dir": str(out),
                                                "report": str(tmp_path / "align.json"), "output_size": 256,
                                                "supersample": 2, "workers": 2}}))
    done = 0
    for how, code, word in [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                            (signal.SIGKILL, -9, None)]:
        process = start_align(params, out, tmp_path, done)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) >= 2
        stopped_at = time.monotonic()
        process.send_signal(how)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == code, (how, stderr[-3000:])
        assert time.monotonic() - stopped_at < 10
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"workers left behind by {how.name}: {alive}"
        if done:
            assert f"({done} already aligned, {40 - done} to do)" in stderr, stderr[-3000:]
        if word is not None:
            lines = [line for line in stderr.splitlines() if " INFO " not in line and line.strip()
                     and not line.startswith("align:")]
            assert lines == [f"psp align: {word}; finished work is kept and a rerun resumes"], stderr
        before, done = done, finished_records(out)
        assert before + 3 <= done < 40, (how, before, done)

    result = psp("align", "--params", str(params), "workers=1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"({done} already aligned, {40 - done} to do)" in result.stderr
    report = json.loads((tmp_path / "align.json").read_text())
    assert report["photos"] == 40 and report["faces_aligned"] == 40


# ----------------------------------------------------------------------------- one-line errors, tracebacks for bugs

def test_settings_of_any_section_and_unknown_sections_are_errors_naming_the_key(tmp_path):
    assert "shard.test_fraction" in one_line_error(psp("align", "shard.test_fraction=5", cwd=tmp_path), "align")
    assert "'align.output_size=128'" in one_line_error(psp("train", "align.output_size=128", cwd=tmp_path), "train")
    params = tmp_path / "params.yaml"
    params.write_text("aligns:\n  output_size: 128\n")
    assert "unknown section 'aligns'" in one_line_error(psp("align", "--params", str(params), cwd=tmp_path), "align")
    params.write_text("align:\n  workers: 1\nshard:\n  test_fraction: 5\n")
    line = one_line_error(psp("align", "--params", str(params), "-v", cwd=tmp_path), "align")
    assert "shard.test_fraction: Input should be less than or equal to 1 (got 5)" in line
    result = psp("import-checkpoint", "model.pt", "x=1", cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: x=1" in result.stderr


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import pipelines.stages.align

    def broken(cfg):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(pipelines.stages.align, "align_folder", broken)
    (tmp_path / "params.yaml").write_text("align:\n  workers: 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="a bug"):
        main(["align"])


def test_help_lists_every_key_of_the_section_with_default_and_description(capsys):
    for name, command in COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"example:\n  {command.example}" in out and f"psp {name}" in command.example
        if command.section is None:
            continue
        schema = SECTIONS[command.section]
        for key, info in schema.model_fields.items():
            line = next(line for line in out.splitlines() if line.startswith(f"  {command.section}.{key} ("))
            assert info.description and info.description in line, line
            assert "default " in line


@pytest.mark.parametrize("broken, named", [
    ({"opts": ["a", "list"]}, "'opts' must be a dict"),
    ({"state_dict": ["a", "list"]}, "'state_dict' must be a dict of tensors"),
    ({"latent_avg": "mean"}, "'latent_avg' must be a tensor"),
    ({"opts": {"output_size": -64}}, "output_size must be a positive integer"),
    ({"opts": {"encoder_num_layers": 34}}, "encoder_num_layers must be one of 50, 100, 152, got 34"),
    ({"opts": {"encoder_mode": "foo"}}, "encoder_mode must be one of ir, ir_se, got 'foo'"),
    ({"opts": {"n_mlp": 2000}}, "n_mlp must be in 1..8, got 2000"),
    ({"opts": {"style_dim": 65536}}, "style_dim must be 512"),
    ({"opts": {"output_size": 32, "encoder_input_size": 32}}, "output_size 32: the file's generator makes 16 px images"),
])
def test_structurally_wrong_checkpoints_are_one_line_naming_the_key(tmp_path, monkeypatch, capsys, broken, named):
    net = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
    path = tmp_path / "bad.pt"
    save_psp(net, path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(broken)
    torch.save(checkpoint, path)
    monkeypatch.chdir(tmp_path)
    assert main(["import-checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and str(path) in err
    assert not (tmp_path / "mlflow").exists()   # nothing logged for a file that does not load


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_random_bytes_and_a_pickle_with_code_get_different_messages_without_torchs_advice(tmp_path, capsys,
                                                                                        monkeypatch):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": RunsCode()}, tmp_path / "code.pt")
    monkeypatch.chdir(tmp_path)
    messages = []
    for name in ("random.pt", "code.pt"):
        assert main(["import-checkpoint", name]) == 2
        messages.append(capsys.readouterr().err)
    assert "truncated or not a PyTorch checkpoint" in messages[0] and "would import" not in messages[0]
    assert "it would import posix.system when loaded" in messages[1]
    assert not any("weights_only=False" in m or "\n" in m.rstrip("\n") for m in messages)


def tiny_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    net = build_psp(PSPArchitecture(output_size=16, encoder_input_size=32), mean_latent_samples=64)
    return save_psp(net, folder / "tiny.pt")


@pytest.mark.parametrize("damage", ["footer", "data"])
def test_invert_on_a_garbled_shard_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, damage):
    shards = make_shards(tmp_path, images=6)
    shard = next(shards.glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    where = len(data) - 40 if damage == "footer" else len(data) // 2
    data[where:where + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("invert:\n  lpips_backbone: random\n")
    started = time.monotonic()
    code = main(["invert", f"invert.model={tiny_checkpoint(tmp_path)}", f"invert.input={shards}",
                 f"invert.output_dir={tmp_path / 'latents'}", f"invert.report={tmp_path / 'invert.json'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and shard.name in err
    assert time.monotonic() - started < 20
    assert not (tmp_path / "latents").exists()


def test_invert_without_the_lpips_weights_is_one_line_before_ray(tmp_path, monkeypatch, capsys):
    shards = make_shards(tmp_path, images=4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("invert:\n  lpips_backbone: pretrained\n")
    code = main(["invert", f"invert.model={tiny_checkpoint(tmp_path)}", f"invert.input={shards}",
                 f"invert.output_dir={tmp_path / 'latents'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "alexnet-owt-7be5be79.pth" in err
    assert not (tmp_path / "latents").exists()


def test_invert_resolves_the_model_before_aligning_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(ASTRONAUT))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("invert:\n  lpips_backbone: random\n")
    code = main(["invert", "invert.model=models:/psp-encoder@nobody", f"invert.input={photos}", "invert.aligned=false",
                 f"invert.output_dir={tmp_path / 'latents'}"])
    assert code == 2 and "psp-encoder" in capsys.readouterr().err
    assert not (tmp_path / "latents").exists()


def test_invert_refuses_an_output_folder_of_someone_elses_files(tmp_path, monkeypatch, capsys):
    shards = make_shards(tmp_path, images=4)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text("their manifest")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("invert:\n  lpips_backbone: random\n")
    code = main(["invert", f"invert.model={tiny_checkpoint(tmp_path)}", f"invert.input={shards}",
                 f"invert.output_dir={theirs}"])
    assert code == 2 and "not an output folder of `psp invert`" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["manifest.json"]
    assert (theirs / "manifest.json").read_text() == "their manifest"


# ----------------------------------------------------------------------------- honest splits

def groups_by_split(shards: Path, key) -> dict[str, set[str]]:
    table = pq.read_table(sorted(shards.glob("*.parquet")), columns=["source_path", "split"]).to_pylist()
    found: dict[str, set[str]] = {"train": set(), "test": set()}
    for row in table:
        found[row["split"]].add(key(row["source_path"]))
    return found


def write_identity_folders(folder: Path, people: range, photos_per_person: int = 3) -> None:
    from helpers.pipelines import face_like_png

    for person in people:
        (folder / f"person{person:03d}").mkdir(parents=True, exist_ok=True)
        for photo in range(photos_per_person):
            path = folder / f"person{person:03d}" / f"photo{photo}.png"
            path.write_bytes(face_like_png(1000 * person + photo, size=32))


@pytest.mark.parametrize("split_by", ["folder", "photo"])
def test_no_group_straddles_the_split_and_splits_are_stable_when_rows_are_added(tmp_path, split_by):
    folder = tmp_path / "faces"
    write_identity_folders(folder, range(40))
    key = (lambda p: p.rpartition("/")[0]) if split_by == "folder" else (lambda p: p)
    cfg = ShardConfig(input_dir=str(folder), output_dir=str(tmp_path / "shards"), report=str(tmp_path / "r.json"),
                      test_fraction=0.3, split_by=split_by)
    write_shards(cfg)
    before = groups_by_split(tmp_path / "shards", key)
    assert before["train"] and before["test"] and not before["train"] & before["test"]
    manifest = read_manifest(tmp_path / "shards")
    assert manifest.document["split_by"] == split_by
    assert manifest.document["groups"] == {"train": len(before["train"]), "test": len(before["test"])}
    if split_by == "folder":
        assert manifest.rows["test"] == 3 * len(before["test"])

    write_identity_folders(folder, range(40, 80))
    write_shards(cfg)
    after = groups_by_split(tmp_path / "shards", key)
    assert not after["train"] & after["test"]
    assert before["train"] <= after["train"] and before["test"] <= after["test"]


def test_faces_of_one_photo_share_a_split(tmp_path):
    """With align's index, `photo` groups every face of one source photo (faces=all of a group photo)."""
    import pyarrow as pa

    from helpers.pipelines import face_like_png
    from pipelines.stages.align import INDEX_SCHEMA

    aligned = tmp_path / "aligned"
    aligned.mkdir()
    rows = []
    for photo in range(30):
        for face in range(2):
            name = f"photo{photo:02d}-f{face}.png"
            (aligned / name).write_bytes(face_like_png(100 * photo + face, size=32))
            rows.append({"file": name, "source_path": f"group{photo:02d}.jpg", "face": face, "score": 1.0,
                         "width": 32, "height": 32, "landmarks": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), aligned / "index.parquet")
    write_shards(ShardConfig(input_dir=str(aligned), output_dir=str(tmp_path / "shards"),
                             report=str(tmp_path / "r.json"), test_fraction=0.3))
    split = groups_by_split(tmp_path / "shards", lambda p: p)
    assert split["train"] and split["test"] and not split["train"] & split["test"]


# ----------------------------------------------------------------------------- config from the core

def test_train_options_have_one_definition_in_psp_core():
    import dataclasses

    for option in dataclasses.fields(TrainingConfig):
        field = TrainConfig.model_fields[option.name]
        assert field.default == option.default and field.description == option.metadata["doc"]
    for name in ("encoder_type", "output_size", "encoder_input_size", "start_from_latent_avg"):
        option = next(f for f in dataclasses.fields(PSPArchitecture) if f.name == name)
        assert TrainConfig.model_fields[name].default == option.default
    cfg = TrainConfig(max_steps=7, output_size=64, encoder_input_size=64)
    assert cfg.training() == TrainingConfig(max_steps=7)
    assert cfg.architecture(1) == PSPArchitecture(input_nc=1, output_size=64, encoder_input_size=64)
    with pytest.raises(Exception, match="output_size must be a power of two"):
        TrainConfig(output_size=100)
    assert math.isclose(TrainConfig().learning_rate, TrainingConfig().learning_rate)


# ----------------------------------------------------------------------------- clean stops of a Ray stage

def stop_invert_midway(folder: Path, how: signal.Signals, at_least: int) -> str:
    """Start `psp invert` in `folder`, stop it with `how` once `at_least` output files exist, check that
    no process it started survives; returns its stderr."""
    process = subprocess.Popen([PSP_CLI, "invert"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_until(lambda: len(list((folder / "latents").glob("shard-*.parquet"))) >= at_least, process, 240,
               f"{at_least} inverted files", every=0.05)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in descendants)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == {signal.SIGTERM: 143, signal.SIGKILL: -9}[how], stderr[-4000:]
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    return stderr


@pytest.mark.slow
def test_a_stopped_invert_leaves_no_ray_process_and_reruns_write_only_the_rest(tmp_path):
    from helpers.pipelines import face_like_png

    faces = tmp_path / "faces"
    faces.mkdir()
    for seed in range(30):
        (faces / f"face{seed:02d}.png").write_bytes(face_like_png(seed))
    write_shards(ShardConfig(input_dir=str(faces), output_dir=str(tmp_path / "shards"),
                             report=str(tmp_path / "shard.json"), rows_per_shard=3, test_fraction=0.0))
    torch.manual_seed(0)
    # a 32 px generator and two style-mixed variants: ~1.3 s a file of 3 images on an idle 2-core VM (4 s at 128 px), so
    # the stop lands mid-way
    save_psp(build_psp(PSPArchitecture(output_size=32, encoder_input_size=64), mean_latent_samples=64),
             tmp_path / "model.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"invert": {
        "model": "model.pt", "input": "shards", "output_dir": "latents", "report": "invert.json",
        "lpips_backbone": "random", "batch_size": 1, "cpus_per_actor": 1, "n_outputs": 2}}))
    files = lambda: {p.name: (p.read_bytes(), p.stat().st_mtime_ns)  # noqa: E731
                     for p in (tmp_path / "latents").glob("shard-*.parquet")}

    # SIGTERM with Ray running (SIGKILL and the reaper: tests/e2e/test_train_ray.py kills a training driver)
    stderr = stop_invert_midway(tmp_path, signal.SIGTERM, at_least=2)
    assert stderr.rstrip().splitlines()[-1] == "psp invert: terminated; finished work is kept and a rerun resumes"
    after_stop = files()
    assert 2 <= len(after_stop) < 10
    for name in after_stop:   # every file under its final name is complete
        pq.read_table(tmp_path / "latents" / name)

    foreign = {".backup.tmp", ".shard-00001.parquet.bak.tmp", ".notes.tmp"}   # a user's files: the rerun keeps them
    for name in foreign:
        (tmp_path / "latents" / name).write_text("the user's")
    result = subprocess.run([PSP_CLI, "invert"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "invert.json").read_text())
    assert report["units_skipped"] == len(after_stop) and report["images_written"] == 30 - 3 * len(after_stop)
    final = files()
    assert len(final) == 10 and all(final[name] == value for name, value in after_stop.items())
    ids = lambda path: [r["id"] for r in pq.read_table(path, columns=["id"]).to_pylist()]  # noqa: E731
    for shard in (tmp_path / "shards").glob("*.parquet"):   # each output file holds its shard's rows, once each
        written = ids(tmp_path / "latents" / shard.name)
        assert sorted(set(written)) == sorted(ids(shard)) and len(written) == 3 * len(set(written)), shard.name
    assert {p.name for p in (tmp_path / "latents").glob(".*.tmp")} == foreign   # the stopped run's own are gone
