"""FFHQ alignment: the crop geometry, robustness to hostile input, rejects, resume."""
from __future__ import annotations

import argparse
import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from pipelines.stages.align import AlignConfig, align_folder, run
from pipelines.stages.sample import Augmentation, exif_rotated_jpeg, gray16, side_by_side, with_alpha
from psp_core.data.align import FaceFinder, PhotoRejected, align_face, ffhq_quad, landmarks_in_crop, load_photo


def hand_landmarks(eye_left, eye_right, mouth_left, mouth_right) -> np.ndarray:
    """68 landmarks with every eye point on the eye centre and the mouth corners given (others zero)."""
    points = np.zeros((68, 2))
    points[36:42] = eye_left
    points[42:48] = eye_right
    points[48] = mouth_left
    points[54] = mouth_right
    return points


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder(upsample=1, threshold=0.3)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def test_quad_from_landmarks_matches_hand_worked_numbers():
    # eyes at (40,50) and (60,50), mouth corners (45,70) (55,70):
    # eye_to_eye (20,0), eye_to_mouth (0,20) -> axis (20,0)+(20,0) = (40,0), unit (1,0), half-side
    # max(20*2, 20*1.8) = 40; centre (50,50) + 0.1*(0,20) = (50,52); corners 50+-40, 52+-40.
    quad, side = ffhq_quad(hand_landmarks((40, 50), (60, 50), (45, 70), (55, 70)))
    np.testing.assert_allclose(quad, [[10, 12], [10, 92], [90, 92], [90, 12]])
    assert side == pytest.approx(80)

    # A long face: eyes 10 apart, mouth 30 below -> half-side max(10*2, 30*1.8) = 54, centre (50,53).
    quad, side = ffhq_quad(hand_landmarks((45, 50), (55, 50), (48, 80), (52, 80)))
    np.testing.assert_allclose(quad, [[-4, -1], [-4, 107], [104, 107], [104, -1]])
    assert side == pytest.approx(108)


def test_quad_turns_with_the_face():
    # The same face turned 90 degrees clockwise about (50,50): (x, y) -> (100 - y, x).
    turn = lambda p: np.array([100 - p[1], p[0]])
    quad, _ = ffhq_quad(hand_landmarks(turn((40, 50)), turn((60, 50)), turn((45, 70)), turn((55, 70))))
    upright = np.array([[10, 12], [10, 92], [90, 92], [90, 12]])
    np.testing.assert_allclose(quad, [turn(p) for p in upright], atol=1e-9)


def test_landmarks_map_into_the_crop():
    landmarks = hand_landmarks((40, 50), (60, 50), (45, 70), (55, 70))
    quad, _ = ffhq_quad(landmarks)
    mapped = landmarks_in_crop(landmarks, quad, 256)
    # left eye: (40-10)/80*256 - 0.5 = 95.5, (50-12)/80*256 - 0.5 = 121.1 (pixel centres at integers)
    np.testing.assert_allclose(mapped[36], [95.5, 121.1])
    np.testing.assert_allclose(mapped[54], [(55 - 10) / 80 * 256 - 0.5, (70 - 12) / 80 * 256 - 0.5])


def test_crop_pixels_sit_where_the_landmark_map_says():
    # A blob at (70, 60) cut with an axis-aligned 100 px quad into 50, 100 and 37 px images.
    ys, xs = np.mgrid[:200, :200]
    blob = (np.exp(-((xs - 70.0) ** 2 + (ys - 60.0) ** 2) / 18.0) * 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(blob[..., None], 3, axis=2))
    quad = np.array([[40.0, 30], [40, 130], [140, 130], [140, 30]])
    for size in (50, 100, 37):
        out = np.asarray(image.transform((size, size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()),
                                         Image.Resampling.BILINEAR)).astype(float)[..., 0]
        yy, xx = np.mgrid[:size, :size]
        centre = [(xx * out).sum() / out.sum(), (yy * out).sum() / out.sum()]
        np.testing.assert_allclose(centre, landmarks_in_crop(np.array([[70.0, 60]]), quad, size)[0], atol=0.05)


def test_augmented_copies_align_to_the_same_crop(finder, astronaut):
    """Known rotation / scale / shift / mirror / resolution changes of one photo give nearly the same crop.

    Measured (256 px, astronaut): mean abs pixel difference 2.1-5.8 of 255 and correlation
    0.985-0.998 against the crop of the original; an unrelated face (grace_hopper) gives 72 and 0.30.
    Landmarks in the crop move by 0.9-1.3 px on average.
    """
    def aligned(photo):
        face = finder.find(np.asarray(photo))[0]
        image, landmarks = align_face(photo, face.landmarks, 256)
        return np.asarray(image).astype(np.float64), landmarks

    reference, reference_landmarks = aligned(astronaut)
    changes = [
        Augmentation(angle=10),
        Augmentation(scale=0.7),
        Augmentation(shift=(0.08, -0.06)),
        Augmentation(angle=-7, scale=1.15, shift=(-0.05, 0.05)),
        Augmentation(resolution=0.6),
        Augmentation(mirror=True, angle=5),
    ]
    for change in changes:
        image, landmarks = aligned(change.apply(astronaut))
        if change.mirror:
            image = image[:, ::-1]
        else:
            assert np.linalg.norm(landmarks - reference_landmarks, axis=1).mean() < 2.5, change
        assert np.abs(image - reference).mean() < 8.0, change
        assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.97, change


def test_aligned_landmarks_agree_with_redetection(finder, astronaut):
    face = finder.find(np.asarray(astronaut))[0]
    image, landmarks = align_face(astronaut, face.landmarks, 256)
    assert image.size == (256, 256) and landmarks.shape == (68, 2) and landmarks.dtype == np.float32
    again = finder.find(np.asarray(image))[0].landmarks
    assert np.linalg.norm(again - landmarks, axis=1).mean() < 2.0  # measured 0.98 px


def test_supersampled_crop_is_a_downscaled_finer_crop(finder, astronaut, tmp_path):
    """supersample=4 resamples the quad at 4x and downscales with LANCZOS: close to the plain crop, but
    measurably not it, and (nearly) the 4x-size crop downsampled with LANCZOS; `align.supersample` reaches it."""
    face = finder.find(np.asarray(astronaut))[0]
    plain, _ = align_face(astronaut, face.landmarks, 128)
    fine, _ = align_face(astronaut, face.landmarks, 128, supersample=4)
    big, _ = align_face(astronaut, face.landmarks, 512)
    reference = np.asarray(big.resize((128, 128), Image.Resampling.LANCZOS), float)
    assert fine.size == (128, 128)
    fine_px, plain_px = np.asarray(fine, float), np.asarray(plain, float)
    to_plain = np.abs(fine_px - plain_px).mean()
    to_reference = np.abs(fine_px - reference).mean()
    assert 0.5 < to_plain < 4.0, to_plain
    assert to_reference < 0.25 * to_plain, (to_reference, to_plain)
    assert np.abs(plain_px - reference).mean() > 4 * to_reference

    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "a.png")
    out = tmp_path / "aligned"
    align_folder(AlignConfig(input_dir=str(folder), output_dir=str(out), report=str(tmp_path / "r.json"),
                             output_size=128, supersample=4, workers=1))
    [row] = pq.read_table(out / "index.parquet").to_pylist()
    np.testing.assert_array_equal(np.asarray(Image.open(out / row["file"])), np.asarray(fine))


def test_mission_patch_is_below_threshold_and_the_face_wins(finder, astronaut):
    faces = finder.find(np.asarray(astronaut))
    assert len(faces) == 1 and faces[0].score > 1.0  # the patch (score ~0.12) is under 0.3
    low = FaceFinder(upsample=1, threshold=0.05).find(np.asarray(astronaut))
    assert len(low) == 2 and low[0].score > low[1].score  # most prominent first


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb is rejected from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory, astronaut) -> Path:
    """A photo folder with one of every awkward case, and which reason each must end with."""
    import matplotlib.cbook

    folder = tmp_path_factory.mktemp("hostile")
    grace = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    files = {
        "good.jpg": encode(astronaut, "JPEG", quality=92),
        "sub/nested.png": encode(grace, "PNG"),
        "cmyk.jpg": encode(astronaut.convert("CMYK"), "JPEG", quality=90),
        "gray16.png": encode(gray16(astronaut), "PNG"),
        "alpha.png": encode(with_alpha(grace), "PNG"),
        "palette.png": encode(astronaut.quantize(256), "PNG"),
        "palette_transparent.gif": encode(astronaut.quantize(255), "GIF", transparency=0),
        "grayscale.jpg": encode(grace.convert("L"), "JPEG"),
        "exif_rotated.jpg": exif_rotated_jpeg(grace),
        "two_faces.jpg": encode(side_by_side(astronaut, grace), "JPEG", quality=92),
        "truncated.jpg": encode(astronaut, "JPEG")[:9000],
        "text.png": b"not an image at all\n",
        "empty.jpg": b"",
        "bomb.png": png_header_only(30000, 30000),
        "coffee.jpg": encode(Image.fromarray(skimage.data.coffee()), "JPEG"),
        "tiny.jpg": encode(astronaut.resize((230, 230), Image.Resampling.LANCZOS), "JPEG", quality=92),
        "readme.txt": b"ignored: no image extension",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


EXPECTED_REJECTS = {
    "truncated.jpg": "unreadable",
    "text.png": "not_image",
    "empty.jpg": "not_image",
    "bomb.png": "too_large",
    "coffee.jpg": "no_face",
    "tiny.jpg": "too_small",
    "two_faces.jpg": "extra_face",
}
GOOD = {"good.jpg", "sub/nested.png", "cmyk.jpg", "gray16.png", "alpha.png", "palette.png",
        "palette_transparent.gif", "grayscale.jpg", "exif_rotated.jpg", "two_faces.jpg"}


def read_rejects(output_dir: Path) -> dict[str, list[str]]:
    rejects: dict[str, list[str]] = {}
    with open(output_dir / "rejects.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            assert row["detail"], row
            rejects.setdefault(row["path"], []).append(row["reason"])
    return rejects


def test_every_bad_input_is_a_reject_row_and_good_photos_all_align(hostile_folder, tmp_path):
    out = tmp_path / "aligned"
    cfg = AlignConfig(input_dir=str(hostile_folder), output_dir=str(out), report=str(tmp_path / "align.json"),
                      output_size=64, workers=1)
    report = align_folder(cfg)
    rejects = read_rejects(out)
    assert {path: reasons[0] for path, reasons in rejects.items()} == EXPECTED_REJECTS
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {row["source_path"] for row in index} == GOOD
    assert report["photos"] == len(GOOD) + len(EXPECTED_REJECTS) - 1  # two_faces is in both
    assert report["other_files_ignored"] == 1
    assert report["faces_aligned"] == len(index) == len(list(out.glob("*.png")))
    for row in index:
        image = Image.open(out / row["file"])
        assert image.mode == "RGB" and image.size == (64, 64)
        landmarks = np.array(row["landmarks"])
        assert landmarks.shape == (68, 2) and np.all((landmarks > -8) & (landmarks < 72))


def test_exif_rotation_is_applied_before_detection(tmp_path, finder):
    import matplotlib.cbook

    grace = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated_jpeg(grace))
    assert Image.open(path).size == (grace.height, grace.width)  # stored turned
    photo = load_photo(path, 10**8)
    assert photo.size == grace.size
    assert finder.find(np.asarray(photo))
    with pytest.raises(PhotoRejected, match="no_face"):
        finder.find(np.asarray(Image.open(path).convert("RGB")))  # without the EXIF turn: no face


def test_sixteen_bit_and_alpha_images_convert_to_sensible_rgb(astronaut):
    buffer = io.BytesIO(encode(gray16(astronaut), "PNG"))
    buffer.name = "x.png"
    path_free = Image.open(buffer)
    assert path_free.mode.startswith("I")
    from psp_core.data.align import to_rgb
    rgb = np.asarray(to_rgb(path_free), float)
    assert rgb.shape[2] == 3 and abs(rgb.mean() - np.asarray(astronaut.convert("L"), float).mean()) < 1.0
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255  # composited on white, not black


def test_faces_all_keeps_both_faces_of_a_group_photo(hostile_folder, tmp_path):
    folder = tmp_path / "group"
    folder.mkdir()
    (folder / "two.jpg").write_bytes((hostile_folder / "two_faces.jpg").read_bytes())
    out = tmp_path / "aligned"
    align_folder(AlignConfig(input_dir=str(folder), output_dir=str(out), report=str(tmp_path / "r.json"),
                             output_size=64, faces="all", workers=1))
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(row["face"] for row in index) == [0, 1]
    assert not read_rejects(out)


def test_stage_exits_zero_and_rerun_resumes(hostile_folder, tmp_path, monkeypatch, caplog):
    params = tmp_path / "params.yaml"
    out = tmp_path / "aligned"
    params.write_text(f"align:\n  input_dir: {hostile_folder}\n  output_dir: {out}\n"
                      f"  report: {tmp_path / 'align.json'}\n  output_size: 64\n  workers: 2\n")
    args = argparse.Namespace(params=str(params), overrides=[])
    assert run(args) == 0  # through the process pool
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    index = (out / "index.parquet").read_bytes()

    victim = sorted(first)[0]
    (out / victim).unlink()
    caplog.set_level("INFO", logger="pipelines.stages.align")
    assert run(argparse.Namespace(params=str(params), overrides=["workers=1"])) == 0
    assert f"({len(GOOD) + len(EXPECTED_REJECTS) - 2} already aligned, 1 to do)" in caplog.text
    second = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert second.keys() == first.keys()
    assert all(second[name] == first[name] for name in first if name != victim)
    assert (out / "index.parquet").read_bytes() == index

    caplog.clear()  # a changed setting redoes everything and removes the old outputs
    assert run(argparse.Namespace(params=str(params), overrides=["output_size=32", "workers=1"])) == 0
    assert "(0 already aligned" in caplog.text
    assert {Image.open(p).size for p in out.glob("*.png")} == {(32, 32)}


def test_skip_alignment_only_resizes(tmp_path, astronaut):
    folder = tmp_path / "aligned_set"
    folder.mkdir()
    astronaut.save(folder / "a.png")
    astronaut.crop((0, 0, 512, 400)).save(folder / "b.jpg")
    out = tmp_path / "out"
    align_folder(AlignConfig(input_dir=str(folder), output_dir=str(out), report=str(tmp_path / "r.json"),
                             output_size=128, skip_alignment=True, workers=1))
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["landmarks"] for row in index] == [None, None]
    expected = np.asarray(astronaut.resize((128, 128), Image.Resampling.LANCZOS), float)
    got = np.asarray(Image.open(out / index[0]["file"]), float)
    assert np.abs(got - expected).mean() < 0.5
    # the 512x400 photo: its centre 400x400 square, LANCZOS-resized (not squashed, not a corner)
    with Image.open(folder / "b.jpg") as b:
        square = b.convert("RGB").crop((56, 0, 456, 400))
    expected_b = np.asarray(square.resize((128, 128), Image.Resampling.LANCZOS), float)
    got_b = np.asarray(Image.open(out / index[1]["file"]), float)
    assert got_b.shape == (128, 128, 3)
    assert np.abs(got_b - expected_b).mean() < 0.5


def test_an_unexpected_failure_is_an_error_row_not_a_crash(tmp_path, astronaut, monkeypatch):
    import pipelines.stages.align

    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "a.jpg")
    astronaut.save(folder / "b.png")

    def broken(photo, landmarks, output_size, supersample):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipelines.stages.align, "align_face", broken)
    out = tmp_path / "aligned"
    report = align_folder(AlignConfig(input_dir=str(folder), output_dir=str(out), report=str(tmp_path / "r.json"),
                                      workers=1))
    assert report["reject_reasons"] == {"error": 2}
    assert read_rejects(out) == {"a.jpg": ["error"], "b.png": ["error"]}


def test_images_of_a_photo_stopped_before_its_record_are_the_stages_own_on_rerun(tmp_path, astronaut, monkeypatch):
    import pipelines.stages.align

    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "a.png")
    cfg = AlignConfig(input_dir=str(folder), output_dir=str(tmp_path / "out"), report=str(tmp_path / "r.json"),
                      output_size=64, skip_alignment=True, workers=1)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the image is written, the final record is not

    with monkeypatch.context() as patch:
        patch.setattr(pipelines.stages.align, "photo_record", stopped)
        with pytest.raises(KeyboardInterrupt):
            align_folder(cfg)
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    report = align_folder(cfg)
    assert report["faces_aligned"] == 1 and report["reject_reasons"] == {}


def test_output_folder_must_not_overlap_the_photos(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match="must not contain each other"):
        align_folder(AlignConfig(input_dir=str(tmp_path / "photos"), output_dir=str(tmp_path / "photos" / "out")))
