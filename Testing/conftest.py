"""Shared pytest fixtures: tiny real Keras models with their cards, and small volumes.

Models are tiny (base_filters=2, patch 16^3) so that the whole suite runs on 2 CPU cores in minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_PATCH = (16, 16, 16)

TINY_CARD = {
    "format_version": 1,
    "name": "tiny-test-model",
    "version": "0.0.1",
    "description": "Randomly initialised tiny U-Net for tests.",
    "intended_use": "Tests only.",
    "network": {"architecture": "unet3d-seed", "base_filters": 2, "dropout_rate": 0.15},
    "input": {
        "channels": ["T1"],
        "patch_size": list(TINY_PATCH),
        "spacing": "native",
        "orientation": "native",
        "normalization": {"method": "zscore-nonzero"},
        "crop_to_nonzero": False,
    },
    "classes": [
        {"name": "Background", "color": "#000000"},
        {"name": "CSF", "color": "#4a90d9",
         "terminology": {"category": ["SCT", "91720002", "Body substance"],
                         "type": ["SCT", "65216001", "Cerebrospinal fluid"]}},
        {"name": "Grey matter", "color": "#c8c8c8"},
        {"name": "White matter", "color": "#f5e6a0"},
    ],
    "training": {},
}


def save_tiny_model(folder: Path, seed: int = 0, card: dict | None = None, name: str = "tiny") -> Path:
    """Build a tiny seed-topology model with fixed random weights, save `<name>.keras` + card."""
    import keras

    from UNet3DSegmentLib.engine.network import build_unet3d

    keras.utils.set_random_seed(seed)
    card = dict(TINY_CARD if card is None else card)
    model = build_unet3d(
        patch_size=card["input"]["patch_size"],
        in_channels=len(card["input"]["channels"]),
        num_classes=len(card["classes"]),
        base_filters=card["network"]["base_filters"],
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.keras"
    model.save(path)
    (folder / f"{name}.json").write_text(json.dumps(card, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (`tiny.keras` + `tiny.json`), built once per test session."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def oblique_anisotropic_image(shape_zyx=(20, 24, 28), seed: int = 0):
    """A SimpleITK image with an oblique direction, anisotropic spacing and a non-zero origin."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 20.0, size=shape_zyx).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((-12.5, 30.25, 7.0))
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    image.SetDirection(tuple((rotation @ tilt).flatten()))
    return image
