"""Training: data discovery and validation, patch sampling, augmentation, loss, and end-to-end runs.

The end-to-end runs use a tiny network (base_filters 2, patch 16^3) on 24^3 synthetic volumes holding
a bright ball (label 1) and a dark box (label 2), so each takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmentLib.training.augmentation import AugmentationConfig, PatchAugmenter, random_background_noise
from UNet3DSegmentLib.cli.main import main
from UNet3DSegmentLib.training.datasets import check_labels, find_pairs, load_case, split_pairs
from UNet3DSegmentLib.base.errors import EXIT_BAD_INPUT, BadInputError
from UNet3DSegmentLib.engine.card import card_from_dict
from UNet3DSegmentLib.training.loop import (
    PatchSampler,
    TrainingCase,
    class_counts,
    dice_ce_loss,
    dice_from_counts,
)

SIZE = 24
CLASSES = "Background,Ball,Box"


def synthetic_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) (z, y, x): a bright ball (1) and a dark box (2) in noisy tissue, random places."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE, SIZE), np.uint8)
    centre = rng.integers(7, SIZE - 7, size=3)
    labels[(z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 16] = 1
    corner = rng.integers(2, SIZE - 8, size=3)
    box = (slice(corner[0], corner[0] + 5), slice(corner[1], corner[1] + 5), slice(corner[2], corner[2] + 5))
    labels[box][labels[box] == 0] = 2
    image = np.choose(labels, [100.0, 200.0, 40.0]) + rng.normal(0, 10, labels.shape)
    return image.astype(np.float32), labels


def write_pair(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    picture = sitk.GetImageFromArray(image)
    picture.SetSpacing(spacing)
    sitk.WriteImage(picture, str(folder / "imagesTr" / f"{name}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labelsTr" / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("decathlon")
    for index in range(4):
        write_pair(folder, f"case_{index:03d}", *synthetic_case(index))
    return folder


def card(num_classes: int = 3) -> object:
    names = ["Background", "Ball", "Box", "Extra"][:num_classes]
    return card_from_dict({
        "format_version": 1, "name": "t", "input": {"channels": ["image"], "patch_size": [16, 16, 16]},
        "classes": [{"name": n} for n in names],
    })


def train_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", str(data), "-o", str(output), "--classes", CLASSES, "--patch", "16", "--base-filters", "2",
            "--batch-size", "2", "--validation-fraction", "0.25", "--validation-patches", "4", "--seed", "3",
            "--progress", "none", *extra]


# ------------------------------------------------------------------------------------------ datasets
def test_find_pairs_decathlon_layout(dataset: Path) -> None:
    pairs = find_pairs(dataset)
    assert [p.name for p in pairs] == ["case_000", "case_001", "case_002", "case_003"]
    assert pairs[1].images == (dataset / "imagesTr" / "case_001.nii.gz",)
    assert pairs[1].label == dataset / "labelsTr" / "case_001.nii.gz"


def test_find_pairs_nnunet_channels_and_csv(tmp_path: Path) -> None:
    image, labels = synthetic_case(0)
    for channel in range(2):
        (tmp_path / "raw" / "imagesTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "raw" / "imagesTr" / f"brain_{channel:04d}.nii.gz"))
    (tmp_path / "raw" / "labelsTr").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "raw" / "labelsTr" / "brain.nii.gz"))
    pairs = find_pairs(tmp_path / "raw", channels=2)
    assert [(p.name, [i.name for i in p.images]) for p in pairs] == [
        ("brain", ["brain_0000.nii.gz", "brain_0001.nii.gz"])]

    csv = tmp_path / "pairs.csv"
    csv.write_text("t1,t2,label\nraw/imagesTr/brain_0000.nii.gz,raw/imagesTr/brain_0001.nii.gz,"
                   "raw/labelsTr/brain.nii.gz\n")
    (pair,) = find_pairs(csv, channels=2)
    assert pair.images[1] == tmp_path / "raw" / "imagesTr" / "brain_0001.nii.gz"
    assert pair.label == tmp_path / "raw" / "labelsTr" / "brain.nii.gz"
    with pytest.raises(BadInputError, match="2 image column"):
        find_pairs(csv, channels=1)


def test_missing_label_is_named(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", *synthetic_case(0))
    write_pair(tmp_path, "b", *synthetic_case(1))
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(BadInputError, match=r"1 image\(s\).*no label.*b\.nii\.gz"):
        find_pairs(tmp_path)
    assert main(train_args(tmp_path, tmp_path / "m.keras")) == EXIT_BAD_INPUT


def test_geometry_mismatch_and_out_of_range_labels_are_named(tmp_path: Path) -> None:
    image, labels = synthetic_case(0)
    write_pair(tmp_path, "a", image, labels, spacing=(1.0, 1.0, 2.0))  # label keeps spacing 1 mm
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(BadInputError, match=r"labelsTr/a\.nii\.gz does not lie on the grid.*spacing"):
        load_case(pair, card())

    bad = labels.copy()
    bad[0, 0, 0] = 7
    write_pair(tmp_path, "a", image, bad)
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(BadInputError, match=r"a\.nii\.gz holds values 7 outside 0\.\.2"):
        load_case(pair, card())
    with pytest.raises(BadInputError, match="non-integer"):
        check_labels(np.array([0.0, 1.5]), 3, "x.nii")


def test_load_case_normalises_like_inference(dataset: Path) -> None:
    pair = find_pairs(dataset)[0]
    case = load_case(pair, card())
    image, labels = synthetic_case(0)
    assert case.image.shape == (SIZE, SIZE, SIZE, 1)
    np.testing.assert_array_equal(case.labels, labels)
    expected = (image - image.mean()) / image.std()  # every voxel is non-zero: plain z-score
    np.testing.assert_allclose(case.image[..., 0], expected, atol=1e-4)


def test_split_pairs_is_seeded_and_disjoint(dataset: Path) -> None:
    pairs = find_pairs(dataset)
    training, validation = split_pairs(pairs, 0.25, seed=3)
    assert len(training) == 3 and len(validation) == 1
    assert set(p.name for p in training).isdisjoint(p.name for p in validation)
    assert split_pairs(pairs, 0.25, seed=3) == (training, validation)


# ------------------------------------------------------------------------------- sampling, augmenting
def test_sampler_oversamples_foreground_and_is_deterministic() -> None:
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:8, 30:33, 20:23] = 1  # 27 voxels out of 64000
    case = TrainingCase("c", (labels[..., None] * 10.0 + 1.0).astype(np.float32), labels)
    always = PatchSampler([case], (8, 8, 8), 2, foreground_probability=1.0)
    never = PatchSampler([case], (8, 8, 8), 2, foreground_probability=0.0)
    rng = np.random.default_rng(0)
    assert all(always.sample(rng)[1].any() for _ in range(50))
    assert sum(never.sample(rng)[1].any() for _ in range(50)) < 10
    first = always.batch(np.random.default_rng(5), 3)
    second = always.batch(np.random.default_rng(5), 3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    image, patch_labels = always.sample(np.random.default_rng(1))
    np.testing.assert_array_equal(image[..., 0], patch_labels * 10.0 + 1.0)  # image and labels aligned


def test_sampler_pads_small_volumes_with_zeros() -> None:
    labels = np.ones((4, 6, 5), np.uint8)
    case = TrainingCase("small", np.full((4, 6, 5, 1), 3.0, np.float32), labels)
    image, patch_labels = PatchSampler([case], (8, 8, 8), 2, 0.5).sample(np.random.default_rng(0), augment=False)
    assert image.shape == (8, 8, 8, 1) and patch_labels.shape == (8, 8, 8)
    assert image.sum() == 3.0 * 4 * 6 * 5 and patch_labels.sum() == 4 * 6 * 5
    np.testing.assert_array_equal(image[..., 0] == 3.0, patch_labels == 1)


def test_rotated_patches_keep_labels_on_their_voxels() -> None:
    image, labels = synthetic_case(2)
    case = TrainingCase("c", (labels[..., None] + 1.0).astype(np.float32), labels)
    config = AugmentationConfig(flip_axes=(), rotation_probability=1.0, intensity_probability=0.0,
                                noise_probability=0.0, bias_probability=0.0)
    sampler = PatchSampler([case], (16, 16, 16), 3, 1.0, config)
    for seed in range(5):
        patch, patch_labels = sampler.sample(np.random.default_rng(seed))
        inside = patch[..., 0] > 0  # outside the volume: zero image, zero label
        agree = np.abs(patch[..., 0][inside] - (patch_labels[inside] + 1.0)) < 0.5
        assert agree.mean() > 0.9  # linear vs nearest interpolation differ only on edges


def test_augmenter_flips_together_and_keeps_background_zero() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((8, 8, 8)) > 0.5).astype(np.uint8)
    patch = (labels * 2.0)[..., None].astype(np.float32)  # zero exactly where the label is 0
    augmenter = PatchAugmenter(AugmentationConfig(intensity_probability=1.0, noise_probability=1.0,
                                                  bias_probability=1.0))
    for seed in range(10):
        out, out_labels = augmenter(patch, labels, np.random.default_rng(seed))
        np.testing.assert_array_equal(out[..., 0] != 0, out_labels == 1)
        assert out.dtype == np.float32 and out_labels.sum() == labels.sum()
    unchanged, same = PatchAugmenter(AugmentationConfig(enabled=False))(patch, labels, rng)
    assert unchanged is patch and same is labels


def test_background_noise_changes_only_the_background_and_is_seeded() -> None:
    brain = np.zeros((20, 20, 20), np.float32)
    brain[5:15, 5:15, 5:15] = 100.0
    brain[8:12, 8:12, 8:12] = 300.0  # brain mean = (936 x 100 + 64 x 300) / 1000 = 112.8
    outside = brain == 0
    out = random_background_noise(brain, np.random.default_rng(4), sigma_range=(0.05, 0.05),
                                  offset_range=(0.02, 0.02))
    np.testing.assert_array_equal(out[~outside], brain[~outside])  # brain unchanged
    assert np.all(out[outside] > 0) and out.dtype == np.float32  # background no longer zero, non-negative
    # |offset + N(0, sigma)| with offset 2 % and sigma 5 % of the brain's mean (112.8): 2.256 and 5.64
    assert out[outside].std() == pytest.approx(np.sqrt(5.64 ** 2 + 2.256 ** 2 - out[outside].mean() ** 2), rel=0.05)
    assert 4.5 < out[outside].mean() < 5.3  # folded normal mean: 4.91
    np.testing.assert_array_equal(out, random_background_noise(brain, np.random.default_rng(4), (0.05, 0.05),
                                                                (0.02, 0.02)))
    assert not np.array_equal(out, random_background_noise(brain, np.random.default_rng(5), (0.05, 0.05),
                                                            (0.02, 0.02)))
    assert np.array_equal(brain[outside], np.zeros(outside.sum()))  # the input is not modified
    # the config's documented defaults: off for user training, sigma <= 8 %, offset <= 2 %
    config = AugmentationConfig()
    assert config.background_noise_probability == 0.0
    assert config.background_noise_sigma == (0.0, 0.08) and config.background_offset == (0.0, 0.02)


def test_background_noise_twins_are_an_even_share() -> None:
    from UNet3DSegmentLib.training.demo import background_noise_twins

    assert background_noise_twins(16, 0.5) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert background_noise_twins(2, 0.5) == [1]
    assert background_noise_twins(4, 0.0) == [] and background_noise_twins(3, 1.0) == [0, 1, 2]


def test_noisy_background_prepares_like_inference() -> None:
    """The twin goes through the engine's preprocessing: no crop, z-score over the whole volume."""
    from UNet3DSegmentLib.training.datasets import prepare_case
    from UNet3DSegmentLib.training.demo import noisy_background, with_random_background_noise

    array = np.zeros((SIZE, SIZE, SIZE), np.float32)
    array[6:18, 6:18, 6:18] = 150.0
    array[9:15, 9:15, 9:15] = 250.0
    image = sitk.GetImageFromArray(array)
    labels = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    model_card = card_from_dict({
        "format_version": 1, "name": "t", "classes": [{"name": "Background"}, {"name": "Brain"}],
        "input": {"channels": ["T1"], "patch_size": [16, 16, 16], "normalization": {"method": "zscore-nonzero"},
                  "crop_to_nonzero": True}})
    clean = prepare_case("clean", [image], labels, model_card)
    assert clean.image.shape[:3] == (14, 14, 14)  # cropped to the brain (+1 voxel margin)
    twin = with_random_background_noise(image, 7, AugmentationConfig(background_noise_sigma=(0.04, 0.04)))
    noisy = prepare_case("noisy", [twin], labels, model_card)
    assert noisy.image.shape[:3] == (SIZE,) * 3 and noisy.labels.sum() == clean.labels.sum()
    twin_array = sitk.GetArrayFromImage(twin)
    np.testing.assert_array_equal(twin_array[array > 0], array[array > 0])
    expected = (twin_array - twin_array.mean()) / twin_array.std()
    np.testing.assert_allclose(noisy.image[..., 0], expected, atol=1e-4)
    np.testing.assert_array_equal(twin_array, sitk.GetArrayFromImage(
        with_random_background_noise(image, 7, AugmentationConfig(background_noise_sigma=(0.04, 0.04)))))
    fixed = sitk.GetArrayFromImage(noisy_background(image, 0.03, seed=1))  # the evaluation's case
    assert np.all(fixed[array == 0] > 0) and np.array_equal(fixed[array > 0], array[array > 0])
    assert np.abs(fixed[array == 0]).mean() == pytest.approx(0.03 * 250 * np.sqrt(2 / np.pi), rel=0.1)


# ------------------------------------------------------------------------------------- loss, metrics
def test_loss_is_zero_for_a_perfect_prediction_and_large_for_a_wrong_one() -> None:
    labels = np.random.default_rng(0).integers(0, 3, size=(1, 4, 4, 4))
    perfect = np.eye(3, dtype=np.float32)[labels]
    wrong = np.eye(3, dtype=np.float32)[(labels + 1) % 3]
    loss = dice_ce_loss(3)
    assert float(loss(labels, perfect)) == pytest.approx(0.0, abs=1e-3)
    assert float(loss(labels, wrong)) > 10.0


def test_dice_from_counts() -> None:
    predicted = np.array([0, 1, 1, 2, 2, 2])
    reference = np.array([0, 1, 2, 2, 2, 0])
    counts = class_counts(predicted, reference, 4)
    np.testing.assert_array_equal(counts, [[1, 1, 2, 0], [1, 2, 3, 0], [2, 1, 3, 0]])
    np.testing.assert_allclose(dice_from_counts(*counts), [2 / 3, 2 / 3, 4 / 6, 1.0])


# --------------------------------------------------------------------------------------- end to end
def test_train_end_to_end_improves_dice_and_writes_a_loadable_model(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "tiny.keras"
    assert main(train_args(dataset, output, "--epochs", "8", "--steps-per-epoch", "20", "--base-filters", "4",
                           "--learning-rate", "0.01")) == 0
    card_data = json.loads(output.with_suffix(".json").read_text())
    history = card_data["training"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    best = card_data["training"]["validation_dice"]
    assert best["Ball"] >= 0.8 and best["Box"] >= 0.8, history
    assert best["Ball"] > history[0]["dice"]["Ball"] + 0.3 and best["Box"] > history[0]["dice"]["Box"] + 0.3
    assert card_data["training"]["best_epoch"] == max(history, key=lambda h: h["mean_foreground_dice"])["epoch"]
    assert card_data["training"]["precision"] == "float32"  # 16^3 patches: auto keeps float32
    assert card_data["network"] == {"architecture": "unet3d-seed", "base_filters": 4, "dropout_rate": 0.15}
    assert card_data["input"]["patch_size"] == [16, 16, 16]
    assert [c["name"] for c in card_data["classes"]] == CLASSES.split(",")
    cases = card_data["training"]["cases"]
    assert len(cases["validation"]) == 1 and sorted(cases["training"] + cases["validation"]) == [
        "case_000", "case_001", "case_002", "case_003"]

    from UNet3DSegmentLib.engine.loading import load_model

    loaded = load_model(output)
    assert loaded.patch_size == (16, 16, 16) and loaded.num_classes == 3
    assert (tmp_path / "tiny.checkpoint" / "state.json").is_file()
    assert main(train_args(dataset, output, "--epochs", "1", "--steps-per-epoch", "1")) == EXIT_BAD_INPUT  # exists


def test_resume_continues_the_history(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "resumed.keras"
    assert main(train_args(dataset, output, "--epochs", "1", "--steps-per-epoch", "2")) == 0
    assert main(train_args(dataset, output, "--epochs", "2", "--steps-per-epoch", "2", "--resume")) == 0
    state = json.loads((tmp_path / "resumed.checkpoint" / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert main(train_args(dataset, tmp_path / "none.keras", "--resume")) == EXIT_BAD_INPUT


def test_same_seed_gives_the_same_run(dataset: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        output = tmp_path / f"{name}.keras"
        assert main(train_args(dataset, output, "--epochs", "1", "--steps-per-epoch", "3",
                               "--mixed-precision", "off")) == 0
        runs.append(json.loads(output.with_suffix(".json").read_text())["training"]["history"][0])
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-3)
    assert runs[0]["dice"] == pytest.approx(runs[1]["dice"], abs=1e-3)


def test_train_from_a_card_keeps_its_classes_and_input(dataset: Path, tmp_path: Path) -> None:
    from conftest import TINY_CARD

    start = dict(TINY_CARD, input=dict(TINY_CARD["input"], normalization={"method": "percentile-zscore",
                                                                           "lower": 1.0, "upper": 99.0}))
    (tmp_path / "start.json").write_text(json.dumps(start))
    output = tmp_path / "carded.keras"
    args = ["train", str(dataset), "-o", str(output), "--card", str(tmp_path / "start.json"), "--patch", "16",
            "--base-filters", "2", "--epochs", "1", "--steps-per-epoch", "1", "--validation-patches", "1",
            "--progress", "json"]
    assert main(args) == 0
    written = json.loads(output.with_suffix(".json").read_text())
    assert [c["name"] for c in written["classes"]] == [c["name"] for c in TINY_CARD["classes"]]
    assert written["classes"][1]["terminology"] == TINY_CARD["classes"][1]["terminology"]
    assert written["input"]["normalization"] == {"method": "percentile-zscore", "lower": 1.0, "upper": 99.0}
    assert written["name"] == "tiny-test-model"
