"""Latent edits with the real FFHQ direction files: shapes, the InterFaceGAN and GANSpace formulas
against hand computations, SeFa eigenvectors against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from psp_core.editing.directions import (
    FFHQ_DIRECTIONS,
    GanspaceEdit,
    GanspacePCA,
    InterfaceganEdit,
    SefaEdit,
    ganspace,
    interfacegan,
    load_interfacegan,
    sefa,
    sefa_directions,
)
from psp_core.errors import InputError
from psp_core.nets.stylegan2 import Generator
from psp_core.viz import edit_grid


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    return torch.randn(3, 18, 512, generator=torch.Generator().manual_seed(0))


def test_interfacegan_directions_load_in_both_released_shapes(codes):
    age = load_interfacegan(FFHQ_DIRECTIONS / "interfacegan_age.pt", 18)
    raw = torch.load(FFHQ_DIRECTIONS / "interfacegan_age.pt", weights_only=True)
    assert age.shape == (1, 18, 512) and torch.equal(age[0, 7], raw[0])
    pose = load_interfacegan(FFHQ_DIRECTIONS / "interfacegan_pose.pt", 18)
    raw_pose = torch.load(FFHQ_DIRECTIONS / "interfacegan_pose.pt", weights_only=True, map_location="cpu")
    assert pose.shape == (1, 18, 512) and torch.equal(pose, raw_pose)
    edited = interfacegan(codes, age, [-3.0, 0.0, 2.5])
    assert edited.shape == (3, 3, 18, 512)
    for k, factor in enumerate([-3.0, 0.0, 2.5]):
        for n in range(3):
            np.testing.assert_allclose(edited[k, n].numpy(), (codes[n] + factor * raw[0]).numpy(), atol=1e-6)


def test_a_direction_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(InputError, match=r"interfacegan_pose\.pt: direction of shape \[1, 18, 512\]"):
        load_interfacegan(FFHQ_DIRECTIONS / "interfacegan_pose.pt", 10)    # a 64 px generator has 10 styles
    torch.save(torch.zeros(3, 7), tmp_path / "odd.pt")
    with pytest.raises(InputError, match=r"odd\.pt: direction of shape \[3, 7\]"):
        load_interfacegan(tmp_path / "odd.pt", 18)
    torch.save({"mean": torch.zeros(1, 512)}, tmp_path / "pca.pt")
    with pytest.raises(InputError, match=r"pca\.pt: a GANSpace file"):
        GanspacePCA.load(tmp_path / "pca.pt")


def test_direction_files_of_non_finite_or_complex_numbers_are_one_line_naming_the_file(tmp_path):
    bad = {"nan": torch.full((1, 512), float("nan")), "inf": torch.full((1, 512), float("inf")),
           "complex": torch.zeros(1, 512, dtype=torch.complex64), "int": torch.zeros(1, 512, dtype=torch.int64)}
    for name, value in bad.items():
        torch.save(value, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=rf"{name}\.pt: .*(real floating-point|not finite)") as err:
            load_interfacegan(tmp_path / f"{name}.pt", 18)
        assert "\n" not in str(err.value)
    pca = {"mean": torch.zeros(1, 512), "comp": torch.zeros(4, 1, 512), "std": torch.ones(4)}
    cases = {"nan_comp": ({"comp": torch.full((4, 1, 512), float("nan"))}, r"comp .*not finite"),
             "inf_std": ({"std": torch.full((4,), float("inf"))}, r"std .*not finite"),
             "zero_std": ({"std": torch.zeros(4)}, r"std .*> 0"),
             "complex_mean": ({"mean": torch.zeros(1, 512, dtype=torch.complex64)}, r"mean .*real floating-point"),
             "wide_mean": ({"mean": torch.zeros(2, 512)}, r"shapes mean \[2, 512\]"),        # item 9: tracebacked
             "list_mean": ({"mean": [0.0] * 512}, r"mean is a list, not a tensor")}
    for name, (change, message) in cases.items():
        torch.save({**pca, **change}, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=rf"{name}\.pt: .*{message}") as err:
            GanspacePCA.load(tmp_path / f"{name}.pt")
        assert "\n" not in str(err.value)


def test_ganspace_matches_a_hand_computation(codes):
    pca = GanspacePCA.load(FFHQ_DIRECTIONS / "ganspace_ffhq_pca.pt")
    assert pca.comp.shape == (80, 1, 512) and pca.std.shape == (80,)
    index, start, end, strength = 3, 4, 9, 5.0   # a released-style edit: (pca_index, start, end, strength)
    edited = ganspace(codes, pca, index, start, end, strength)

    mean, comp, std = pca.mean.numpy()[0], pca.comp.numpy()[index, 0], float(pca.std[index])
    for n in range(codes.shape[0]):
        latent = codes[n].numpy().astype(np.float64)
        coordinate = sum((latent[0][j] - mean[j]) * comp[j] for j in range(512)) / std
        delta = (strength - coordinate) * comp * std
        expected = latent.copy()
        for style in range(start, end):
            expected[style] += delta
        np.testing.assert_allclose(edited[n].numpy(), expected, atol=2e-4)
    assert torch.equal(edited[:, :start], codes[:, :start]) and torch.equal(edited[:, end:], codes[:, end:])


def test_sefa_eigenvectors_match_numpy_up_to_sign():
    torch.manual_seed(0)
    generator = Generator(32, 512, 2)
    styles = [0, 1, 2]
    values, vectors = sefa_directions(generator, styles)

    weights = [generator.conv1.conv.modulation.weight.detach().numpy().T.astype(np.float64)]
    weights += [generator.convs[i - 1].conv.modulation.weight.detach().numpy().T.astype(np.float64) for i in (1, 2)]
    stacked = np.concatenate(weights, axis=1)
    stacked /= np.linalg.norm(stacked, axis=0, keepdims=True)
    ref_values, ref_vectors = np.linalg.eig(stacked @ stacked.T)
    order = np.argsort(-ref_values.real)
    np.testing.assert_allclose(values.numpy(), ref_values.real[order], rtol=1e-4, atol=1e-4)
    for k in range(5):   # the leading directions (distinct eigenvalues): equal up to sign
        ref = ref_vectors.real[:, order[k]]
        got = vectors[k].numpy()
        assert min(np.abs(got - ref).max(), np.abs(got + ref).max()) < 1e-4, k


def test_sefa_moves_only_the_chosen_styles(codes):
    direction = torch.zeros(512)
    direction[5] = 1.0
    edited = sefa(codes, direction, [2, 3], [-2.0, 4.0])
    assert edited.shape == (2, 3, 18, 512)
    assert torch.equal(edited[:, :, [0, 1, 4]], codes.unsqueeze(0).expand(2, -1, -1, -1)[:, :, [0, 1, 4]])
    assert torch.allclose(edited[1, :, 2, 5] - codes[:, 2, 5], torch.full((3,), 4.0))
    with pytest.raises(InputError, match=r"SeFa styles must be in 0\.\.6"):
        sefa_directions(Generator(32, 512, 2), [7])


def test_edit_grid_puts_codes_in_rows_and_strengths_in_columns():
    colours = torch.linspace(-1, 1, 6).view(2, 3, 1, 1, 1).expand(2, 3, 3, 8, 8)   # [R=2, C=3, 3, 8, 8]
    grid = np.asarray(edit_grid(colours, tile=16, padding=2))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    for row in range(2):
        for column in range(3):
            cell = grid[2 + 18 * row:18 * (row + 1), 2 + 18 * column:18 * (column + 1)]
            expected = round((float(colours[row, column, 0, 0, 0]) + 1) / 2 * 255)
            assert cell.shape == (16, 16, 3) and np.all(cell == expected), (row, column)
    large = torch.rand(1, 2, 3, 64, 64) * 2 - 1
    shrunk = np.asarray(edit_grid(large, tile=32, padding=0)).astype(np.float64) / 255
    pooled = torch.nn.functional.avg_pool2d((large[0] + 1) / 2, 2)                  # area averaging, 2x
    np.testing.assert_allclose(shrunk[:, :32], pooled[0].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)


def test_the_edit_classes_apply_the_formulas_at_every_strength(codes):
    pca = GanspacePCA.load(FFHQ_DIRECTIONS / "ganspace_ffhq_pca.pt")
    moved = GanspaceEdit(pca, 3, 4, 9)(codes, [-5.0, 5.0])
    assert moved.shape == (2, 3, 18, 512)
    assert torch.equal(moved[1], ganspace(codes, pca, 3, 4, 9, 5.0))
    direction = torch.randn(512)
    assert torch.equal(SefaEdit(direction, (1, 2))(codes, [0.0, 2.0]), sefa(codes, direction, [1, 2], [0.0, 2.0]))
    age = load_interfacegan(FFHQ_DIRECTIONS / "interfacegan_age.pt", 18)
    assert torch.equal(InterfaceganEdit(age)(codes, [0.0])[0], codes)
