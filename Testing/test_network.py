"""The seed network builder against the seed document's layer table (shared/seed/README.md).

The table below is copied from the seed README's model summary (tests must not read ../shared). The
README cuts the channel column after a few characters ("(None, 64, 64, 64, 3"); the full channel
counts are the ones its parameter counts imply (896 = 27 * 1 * 32 + 32), checked against the
truncated text when the table was copied. ``tf_op_layer_*`` rows (slice / concat of the seed) have no
parameters and are ``concat_*`` layers here.
"""

from __future__ import annotations

import numpy as np
import pytest

from UNet3DSegmentLib.engine.network import build_unet3d, count_parameters, validate_patch_size

# (layer name, output shape without the batch axis, parameter count), in the seed's layer order.
SEED_LAYERS = [
    ("conv_0_1", (64, 64, 64, 32), 896),
    ("batch_normalization", (64, 64, 64, 32), 128),
    ("activation", (64, 64, 64, 32), 0),
    ("conv_0_2", (64, 64, 64, 64), 55360),
    ("batch_normalization_1", (64, 64, 64, 64), 256),
    ("activation_1", (64, 64, 64, 64), 0),
    ("max_1_1", (32, 32, 32, 64), 0),
    ("conv_1_1", (32, 32, 32, 64), 110656),
    ("batch_normalization_2", (32, 32, 32, 64), 256),
    ("activation_2", (32, 32, 32, 64), 0),
    ("conv_1_2", (32, 32, 32, 128), 221312),
    ("batch_normalization_3", (32, 32, 32, 128), 512),
    ("activation_3", (32, 32, 32, 128), 0),
    ("conv_1_2_dropout", (32, 32, 32, 128), 0),
    ("max_2_1", (16, 16, 16, 128), 0),
    ("conv_2_1", (16, 16, 16, 128), 442496),
    ("batch_normalization_4", (16, 16, 16, 128), 512),
    ("activation_4", (16, 16, 16, 128), 0),
    ("conv_2_2", (16, 16, 16, 256), 884992),
    ("batch_normalization_5", (16, 16, 16, 256), 1024),
    ("activation_5", (16, 16, 16, 256), 0),
    ("conv_2_2_dropout", (16, 16, 16, 256), 0),
    ("max_3_1", (8, 8, 8, 256), 0),
    ("conv_3_1", (8, 8, 8, 256), 1769728),
    ("batch_normalization_6", (8, 8, 8, 256), 1024),
    ("activation_6", (8, 8, 8, 256), 0),
    ("conv_3_2", (8, 8, 8, 512), 3539456),
    ("batch_normalization_7", (8, 8, 8, 512), 2048),
    ("activation_7", (8, 8, 8, 512), 0),
    ("conv_3_2_dropout", (8, 8, 8, 512), 0),
    ("up_conv_3_2", (16, 16, 16, 512), 2097152),
    ("conv_2_3", (16, 16, 16, 256), 5308672),
    ("batch_normalization_8", (16, 16, 16, 256), 1024),
    ("activation_8", (16, 16, 16, 256), 0),
    ("conv_2_4", (16, 16, 16, 256), 1769728),
    ("batch_normalization_9", (16, 16, 16, 256), 1024),
    ("activation_9", (16, 16, 16, 256), 0),
    ("conv_2_4_dropout", (16, 16, 16, 256), 0),
    ("up_conv_2_1", (32, 32, 32, 256), 524288),
    ("conv_1_3", (32, 32, 32, 128), 1327232),
    ("batch_normalization_10", (32, 32, 32, 128), 512),
    ("activation_10", (32, 32, 32, 128), 0),
    ("conv_1_4", (32, 32, 32, 128), 442496),
    ("batch_normalization_11", (32, 32, 32, 128), 512),
    ("activation_11", (32, 32, 32, 128), 0),
    ("conv_1_4_dropout", (32, 32, 32, 128), 0),
    ("conv_1_0", (64, 64, 64, 128), 131072),
    ("conv_0_3", (64, 64, 64, 64), 331840),
    ("batch_normalization_12", (64, 64, 64, 64), 256),
    ("activation_12", (64, 64, 64, 64), 0),
    ("conv_0_4", (64, 64, 64, 64), 110656),
    ("batch_normalization_13", (64, 64, 64, 64), 256),
    ("activation_13", (64, 64, 64, 64), 0),
    ("conv_0_4_dropout", (64, 64, 64, 64), 0),
    ("conv_out", (64, 64, 64, 4), 260),
]

SEED_TOTAL, SEED_TRAINABLE, SEED_NON_TRAINABLE = 19_077_636, 19_072_964, 4_672


@pytest.fixture(scope="module")
def seed_model():
    """The full-size seed model (64^3, 32 base filters), built once: ~3 s."""
    return build_unet3d()


def expected_counts(f: int, c: int, k: int) -> tuple[int, int, int]:
    """(total, trainable, non-trainable) parameters: base filters f, c input channels, k classes.

    Derived by hand from the architecture: 3x3x3 convolutions with bias, BatchNorm after each (2
    trainable + 2 moving statistics per channel), 2x2x2 transposed convolutions without bias, 1x1x1
    softmax head.
    """
    convs = [  # (in, out) of every 3x3x3 convolution
        (c, f), (f, 2 * f), (2 * f, 2 * f), (2 * f, 4 * f), (4 * f, 4 * f), (4 * f, 8 * f),
        (8 * f, 8 * f), (8 * f, 16 * f), (24 * f, 8 * f), (8 * f, 8 * f), (12 * f, 4 * f),
        (4 * f, 4 * f), (6 * f, 2 * f), (2 * f, 2 * f),
    ]
    ups = [(16 * f, 16 * f), (8 * f, 8 * f), (4 * f, 4 * f)]
    conv = sum(27 * i * o + o for i, o in convs)
    up = sum(8 * i * o for i, o in ups)
    bn_channels = sum(o for _, o in convs)
    head = 2 * f * k + k
    trainable = conv + up + 2 * bn_channels + head
    non_trainable = 2 * bn_channels
    return trainable + non_trainable, trainable, non_trainable


def test_every_seed_layer_has_the_seed_shape_and_parameter_count(seed_model):
    layers = {layer.name: layer for layer in seed_model.layers}
    for name, shape, params in SEED_LAYERS:
        assert name in layers, f"layer {name} missing"
        assert tuple(layers[name].output.shape) == (None, *shape), name
        assert layers[name].count_params() == params, name


def test_layer_order_matches_the_seed(seed_model):
    # Legacy weights-only .h5 files are loaded by layer order, so the order is part of the contract.
    ours = [layer.name for layer in seed_model.layers if not layer.name.startswith(("input", "concat"))]
    assert ours == [name for name, _, _ in SEED_LAYERS]
    assert [layer.name for layer in seed_model.layers if layer.name.startswith("concat")] == [
        "concat_2", "concat_1", "concat_0"
    ]


def test_seed_totals(seed_model):
    assert count_parameters(seed_model) == (SEED_TOTAL, SEED_TRAINABLE, SEED_NON_TRAINABLE)
    assert sum(params for _, _, params in SEED_LAYERS) == SEED_TOTAL
    assert expected_counts(32, 1, 4) == (SEED_TOTAL, SEED_TRAINABLE, SEED_NON_TRAINABLE)


def test_seed_input_and_output(seed_model):
    assert tuple(seed_model.inputs[0].shape) == (None, 64, 64, 64, 1)
    assert tuple(seed_model.outputs[0].shape) == (None, 64, 64, 64, 4)
    assert seed_model.get_layer("conv_out").dtype_policy.compute_dtype == "float32"


def test_softmax_output_sums_to_one():
    model = build_unet3d((16, 16, 16), base_filters=2, num_classes=3)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    y = model(x, training=False).numpy()
    assert y.shape == (2, 16, 16, 16, 3) and y.dtype == np.float32
    assert np.all(y >= 0.0) and np.all(y <= 1.0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "base_filters, in_channels, num_classes",
    [(2, 1, 4), (2, 2, 3), (4, 3, 2), (3, 1, 7)],
)
def test_options_change_counts_as_expected(base_filters, in_channels, num_classes):
    model = build_unet3d((16, 16, 16), in_channels, num_classes, base_filters)
    assert count_parameters(model) == expected_counts(base_filters, in_channels, num_classes)
    f = base_filters
    assert model.get_layer("conv_0_1").count_params() == 27 * in_channels * f + f
    assert model.get_layer("conv_out").count_params() == 2 * f * num_classes + num_classes
    assert tuple(model.get_layer("conv_3_2").output.shape) == (None, 2, 2, 2, 16 * f)
    assert tuple(model.outputs[0].shape) == (None, 16, 16, 16, num_classes)
    assert tuple(model.inputs[0].shape) == (None, 16, 16, 16, in_channels)


def test_non_cubic_patch():
    model = build_unet3d((8, 16, 24), base_filters=2)
    assert tuple(model.get_layer("max_3_1").output.shape) == (None, 1, 2, 3, 16)
    assert tuple(model.outputs[0].shape) == (None, 8, 16, 24, 4)
    assert count_parameters(model) == expected_counts(2, 1, 4)  # weights do not depend on the patch


@pytest.mark.parametrize(
    "patch",
    [(15, 16, 16), (16, 16), (16, 16, 16, 16), (4, 8, 8), (0, 16, 16), (-8, 16, 16), (16, 12, 16),
     ("a", 16, 16), None],
)
def test_invalid_patch_sizes_raise_value_error(patch):
    with pytest.raises(ValueError, match="patch size must be three"):
        build_unet3d(patch, base_filters=2)


def test_validate_patch_size_returns_integers():
    assert validate_patch_size([16.0, 24, 32]) == (16, 24, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_channels": 0}, "in_channels must be >= 1"),
        ({"num_classes": 1}, "num_classes >= 2"),
        ({"base_filters": 0}, "base_filters >= 1"),
        ({"dropout_rate": 1.0}, "dropout rate must be >= 0 and < 1"),
        ({"dropout_rate": -0.1}, "dropout rate must be >= 0 and < 1"),
    ],
)
def test_invalid_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet3d((16, 16, 16), **{"base_filters": 2, **kwargs})
