"""The seed 3D U-Net (Çiçek et al. 2016) as a Keras 3 functional model.

With its defaults the builder reproduces the seed network layer for layer: the same layer names
(``conv_0_1`` ... ``conv_out``), output shapes and parameter counts (19,077,636 in all, 4,672 of them
the BatchNorm moving statistics). Keras is imported inside the builder so that importing this module
stays cheap (the command line's ``--help`` must not load TensorFlow).

Axis order: channels-last, ``(batch, z, y, x, channels)``.
"""

from __future__ import annotations

from typing import Any, Sequence

SEED_PATCH_SIZE = (64, 64, 64)
SEED_BASE_FILTERS = 32
SEED_NUM_CLASSES = 4
SEED_IN_CHANNELS = 1
SEED_DROPOUT_RATE = 0.15  # the seed repository's value; inactive at inference
DEPTH = 3  # number of 2x2x2 poolings: patch sides must be multiples of 2**DEPTH


def validate_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Return ``patch_size`` as a 3-tuple, or raise ``ValueError`` if the network cannot take it."""
    factor = 2**DEPTH
    try:
        patch = tuple(int(p) for p in patch_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"patch size must be three integers (z, y, x), got {patch_size!r}") from error
    if len(patch) != 3 or any(p < factor or p % factor for p in patch):
        raise ValueError(
            f"patch size must be three positive multiples of {factor} (z, y, x) for a network with "
            f"{DEPTH} poolings, got {tuple(patch_size)}"
        )
    return patch  # type: ignore[return-value]


def build_unet3d(
    patch_size: Sequence[int] = SEED_PATCH_SIZE,
    in_channels: int = SEED_IN_CHANNELS,
    num_classes: int = SEED_NUM_CLASSES,
    base_filters: int = SEED_BASE_FILTERS,
    dropout_rate: float = SEED_DROPOUT_RATE,
    name: str = "unet3d",
) -> Any:
    """Build the seed 3D U-Net; returns an uncompiled ``keras.Model`` ending in a softmax.

    ``base_filters`` scales every level (the seed uses 32: 32-64 / 64-128 / 128-256 / 256-512).
    The output layer is float32 even under a mixed-precision policy, so probabilities stay exact.
    """
    patch = validate_patch_size(patch_size)
    if in_channels < 1 or num_classes < 2 or base_filters < 1:
        raise ValueError(
            "in_channels must be >= 1, num_classes >= 2 and base_filters >= 1, got "
            f"{in_channels}, {num_classes}, {base_filters}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout rate must be >= 0 and < 1, got {dropout_rate}")

    import keras
    from keras import layers

    counter = {"bn": 0}

    def numbered(prefix: str) -> str:
        index = counter[prefix]
        counter[prefix] += 1
        return "batch_normalization" if index == 0 else f"batch_normalization_{index}"

    def conv_bn_relu(tensor: Any, filters: int, layer_name: str) -> Any:
        index = counter["bn"]
        tensor = layers.Conv3D(filters, 3, padding="same", name=layer_name)(tensor)
        tensor = layers.BatchNormalization(name=numbered("bn"))(tensor)
        return layers.Activation("relu", name="activation" if index == 0 else f"activation_{index}")(tensor)

    def dropout(tensor: Any, layer_name: str) -> Any:
        return layers.Dropout(dropout_rate, name=f"{layer_name}_dropout")(tensor)

    def up(tensor: Any, filters: int, layer_name: str) -> Any:
        return layers.Conv3DTranspose(filters, 2, strides=2, padding="same", use_bias=False, name=layer_name)(
            tensor
        )

    f = base_filters
    inputs = keras.Input(shape=(*patch, in_channels), name="input_img")
    # Encoder: level 0 to 3.
    c01 = conv_bn_relu(inputs, f, "conv_0_1")
    c02 = conv_bn_relu(c01, 2 * f, "conv_0_2")
    x = layers.MaxPooling3D(2, name="max_1_1")(c02)
    x = conv_bn_relu(x, 2 * f, "conv_1_1")
    c12 = dropout(conv_bn_relu(x, 4 * f, "conv_1_2"), "conv_1_2")
    x = layers.MaxPooling3D(2, name="max_2_1")(c12)
    x = conv_bn_relu(x, 4 * f, "conv_2_1")
    c22 = dropout(conv_bn_relu(x, 8 * f, "conv_2_2"), "conv_2_2")
    x = layers.MaxPooling3D(2, name="max_3_1")(c22)
    x = conv_bn_relu(x, 8 * f, "conv_3_1")
    c32 = dropout(conv_bn_relu(x, 16 * f, "conv_3_2"), "conv_3_2")
    # Decoder: skip first, then the upsampled path (the seed's concat order). With "same" padding the
    # seed's centre crops are identities, so they are left out.
    x = layers.Concatenate(name="concat_2")([c22, up(c32, 16 * f, "up_conv_3_2")])
    x = conv_bn_relu(x, 8 * f, "conv_2_3")
    x = dropout(conv_bn_relu(x, 8 * f, "conv_2_4"), "conv_2_4")
    x = layers.Concatenate(name="concat_1")([c12, up(x, 8 * f, "up_conv_2_1")])
    x = conv_bn_relu(x, 4 * f, "conv_1_3")
    x = dropout(conv_bn_relu(x, 4 * f, "conv_1_4"), "conv_1_4")
    x = layers.Concatenate(name="concat_0")([c02, up(x, 4 * f, "conv_1_0")])
    x = conv_bn_relu(x, 2 * f, "conv_0_3")
    x = dropout(conv_bn_relu(x, 2 * f, "conv_0_4"), "conv_0_4")
    outputs = layers.Conv3D(num_classes, 1, activation="softmax", dtype="float32", name="conv_out")(x)
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


def count_parameters(model: Any) -> tuple[int, int, int]:
    """Return ``(total, trainable, non_trainable)`` parameter counts of a Keras model."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    non_trainable = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return trainable + non_trainable, trainable, non_trainable
