"""Training the seed 3D U-Net on labelled volumes: patch sampling, loss, validation, checkpoints.

The job: sample patches (over-sampling foreground classes) from preprocessed training cases, augment
them, minimise soft Dice + cross-entropy with Adam and a polynomial learning-rate decay, measure
per-class Dice on a fixed set of validation patches after every epoch, and keep the best model as
``<name>.keras`` with its model card ``<name>.json`` written together. The model is saved in float32
whatever the training precision, without optimizer or loss, so it loads anywhere in Keras safe mode.
A checkpoint folder ``<name>.checkpoint/`` (weights, optimizer state, history) allows ``resume``.

Cases hold arrays already preprocessed as inference will (see ``datasets.prepare_case``):
``image`` is ``(z, y, x, channels)`` float32, ``labels`` ``(z, y, x)`` integers. TensorFlow/Keras are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .augmentation import AugmentationConfig, PatchAugmenter, random_affine_matrix
from ..base.errors import BadInputError, CancelledError
from ..base.options import TrainOptions
from ..engine.metrics import class_counts, dice_from_counts
from ..runtime.precision import choose_precision

ProgressCallback = Callable[[dict], None]
MAX_INDICES_PER_CLASS = 200_000  # foreground voxel positions kept per class and case, for sampling


@dataclass
class TrainingCase:
    """One preprocessed volume: ``image`` (z, y, x, c) float32 and ``labels`` (z, y, x) ints."""

    name: str
    image: np.ndarray
    labels: np.ndarray


_DEFAULTS = {name: declared.default for name, declared in TrainOptions.OPTIONS.items()}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (recorded in the model card's ``training`` section).

    Defaults are the declared ones of ``base.options.TrainOptions`` (``dropout_rate`` is not a user option).
    """

    patch_size: tuple[int, int, int] = _DEFAULTS["patch"]
    base_filters: int = _DEFAULTS["base_filters"]
    dropout_rate: float = 0.15
    epochs: int = _DEFAULTS["epochs"]
    steps_per_epoch: int = _DEFAULTS["steps_per_epoch"]
    batch_size: int = _DEFAULTS["batch_size"]
    learning_rate: float = _DEFAULTS["learning_rate"]
    foreground_probability: float = _DEFAULTS["foreground_probability"]  # share of patches centred on foreground
    validation_patches: int = _DEFAULTS["validation_patches"]
    seed: int = _DEFAULTS["seed"]
    mixed_precision: str = _DEFAULTS["mixed_precision"]  # "auto" | "on" | "off"
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    @classmethod
    def from_options(cls, options: TrainOptions) -> "TrainConfig":
        """The run described by the command line's ``TrainOptions``."""
        return cls(
            patch_size=options.patch, base_filters=options.base_filters, epochs=options.epochs,
            steps_per_epoch=options.steps_per_epoch, batch_size=options.batch_size,
            learning_rate=options.learning_rate, foreground_probability=options.foreground_probability,
            validation_patches=options.validation_patches, seed=options.seed,
            mixed_precision=options.mixed_precision, augmentation=AugmentationConfig(enabled=options.augmentation),
        )


@dataclass
class TrainingResult:
    """What a run produced: paths, the per-epoch history and the best epoch's validation Dice."""

    model_path: Path
    card_path: Path
    history: list[dict]
    best_epoch: int
    best_dice: dict[str, float]
    seconds: float
    precision: str


# --------------------------------------------------------------------------------------------------
# Patch sampling


class PatchSampler:
    """Draws (patch, labels) pairs, centred on a foreground voxel with ``foreground_probability``.

    A foreground centre is drawn by picking a case, then one of its foreground classes uniformly
    (so small classes are sampled as often as large ones), then one voxel of that class. With the
    augmentation's ``rotation_probability`` the patch is resampled through a random rotation/scaling
    about its centre (linear for the image, nearest for labels); otherwise it is a plain slice.
    Regions outside the volume are zero, as in the sliding window's padding.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        patch_size: Sequence[int],
        num_classes: int,
        foreground_probability: float,
        augmentation: Optional[AugmentationConfig] = None,
    ) -> None:
        if not cases:
            raise BadInputError("no training cases; give at least one image/label pair")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size)
        self.num_classes = num_classes
        self.foreground_probability = foreground_probability
        self.augmentation = augmentation or AugmentationConfig(enabled=False)
        self.augmenter = PatchAugmenter(self.augmentation)
        thinning = np.random.default_rng(12345)
        self.indices: list[dict[int, np.ndarray]] = []
        for case in self.cases:
            per_class = {}
            flat = case.labels.reshape(-1)
            for label in range(1, num_classes):
                where = np.flatnonzero(flat == label)
                if where.size > MAX_INDICES_PER_CLASS:
                    where = np.sort(thinning.choice(where, MAX_INDICES_PER_CLASS, replace=False))
                if where.size:
                    per_class[label] = where
            self.indices.append(per_class)
        self._sitk_channels: dict[int, list[Any]] = {}

    def _centre(self, rng: np.random.Generator, case_index: int, foreground: bool) -> np.ndarray:
        shape = self.cases[case_index].labels.shape
        classes = self.indices[case_index]
        if foreground and classes:
            label = list(classes)[int(rng.integers(len(classes)))]
            flat = classes[label][int(rng.integers(classes[label].size))]
            return np.array(np.unravel_index(flat, shape))
        return np.array([int(rng.integers(s)) for s in shape])

    def _slice(self, case: TrainingCase, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = np.array(case.labels.shape)
        patch = np.array(self.patch)
        start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
        stop = np.minimum(start + patch, shape)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        image = case.image[region]
        labels = case.labels[region]
        if image.shape[:3] != self.patch:
            pad = [(0, int(p - s)) for p, s in zip(patch, image.shape[:3])]
            image = np.pad(image, pad + [(0, 0)])
            labels = np.pad(labels, pad)
        return image, labels

    def _rotated(
        self, case_index: int, centre: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        import SimpleITK as sitk

        case = self.cases[case_index]
        if case_index not in self._sitk_channels:
            channels = [sitk.GetImageFromArray(np.ascontiguousarray(case.image[..., c]))
                        for c in range(case.image.shape[-1])]
            channels.append(sitk.GetImageFromArray(case.labels.astype(np.uint8)))
            self._sitk_channels[case_index] = channels
        a = self.augmentation
        transform = sitk.AffineTransform(3)
        centre_xyz = tuple(float(v) for v in centre[::-1])
        transform.SetCenter(centre_xyz)
        transform.SetMatrix(tuple(random_affine_matrix(rng, a.max_rotation_deg, a.scale_range).flatten()))
        size_xyz = tuple(int(p) for p in self.patch[::-1])
        origin = tuple(c - (s - 1) / 2.0 for c, s in zip(centre_xyz, size_xyz))
        *images, labels = self._sitk_channels[case_index]
        out = [sitk.GetArrayFromImage(sitk.Resample(im, size_xyz, transform, sitk.sitkLinear, origin,
                                                    (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0))
               for im in images]
        label_array = sitk.GetArrayFromImage(sitk.Resample(labels, size_xyz, transform, sitk.sitkNearestNeighbor,
                                                           origin, (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 0))
        return np.stack(out, axis=-1).astype(np.float32), label_array

    def sample(self, rng: np.random.Generator, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One (patch (z, y, x, c) float32, labels (z, y, x) uint8) pair."""
        case_index = int(rng.integers(len(self.cases)))
        centre = self._centre(rng, case_index, rng.random() < self.foreground_probability)
        a = self.augmentation
        if augment and a.enabled and rng.random() < a.rotation_probability:
            image, labels = self._rotated(case_index, centre, rng)
        else:
            image, labels = self._slice(self.cases[case_index], centre)
        if augment:
            image, labels = self.augmenter(image, labels, rng)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.uint8)

    def batch(self, rng: np.random.Generator, size: int, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``size`` pairs stacked: images (b, z, y, x, c), labels (b, z, y, x)."""
        pairs = [self.sample(rng, augment) for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --------------------------------------------------------------------------------------------------
# Metrics, loss


def dice_ce_loss(num_classes: int, smooth: float = 1.0) -> Callable[[Any, Any], Any]:
    """Soft Dice (foreground classes, over the whole batch) + cross-entropy, from integer labels."""
    import tensorflow as tf

    first = 1 if num_classes > 2 else 0

    def loss(labels: Any, probabilities: Any) -> Any:
        probabilities = tf.cast(probabilities, tf.float32)
        onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
        clipped = tf.clip_by_value(probabilities, 1e-7, 1.0)
        cross_entropy = -tf.reduce_mean(tf.reduce_sum(onehot * tf.math.log(clipped), axis=-1))
        axes = [0, 1, 2, 3]
        intersection = tf.reduce_sum(onehot * probabilities, axis=axes)
        sums = tf.reduce_sum(onehot, axis=axes) + tf.reduce_sum(probabilities, axis=axes)
        soft_dice = (2.0 * intersection + smooth) / (sums + smooth)
        return cross_entropy + (1.0 - tf.reduce_mean(soft_dice[first:]))

    return loss


# --------------------------------------------------------------------------------------------------
# Files


def checkpoint_dir(model_path: Path) -> Path:
    """``<name>.keras`` -> ``<name>.checkpoint/`` (weights, optimizer state, history for resume)."""
    return model_path.with_suffix(".checkpoint")


def _export(model: Any, config: TrainConfig, num_classes: int, in_channels: int, path: Path) -> None:
    """Save ``model``'s weights in a float32 copy of the network (no optimizer, no loss), atomically."""
    import keras

    from ..engine.network import build_unet3d

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clean = build_unet3d(config.patch_size, in_channels, num_classes, config.base_filters, config.dropout_rate)
    finally:
        keras.config.set_dtype_policy(previous)
    clean.set_weights(model.get_weights())
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    clean.save(temporary)
    os.replace(temporary, path)


def _save_checkpoint(folder: Path, model: Any, optimizer: Any, state: dict) -> None:
    """Weights, optimizer variables and run state (epoch, history, best) into ``folder``."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    model.save_weights(temporary / "model.weights.h5")
    np.savez(temporary / "optimizer.npz", *[np.asarray(v) for v in optimizer.variables])
    (temporary / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def _load_checkpoint(folder: Path, model: Any, optimizer: Any) -> dict:
    """Restore what ``_save_checkpoint`` wrote; BadInputError if it does not fit the network."""
    try:
        state = json.loads((folder / "state.json").read_text())
        model.load_weights(folder / "model.weights.h5")
        optimizer.build(model.trainable_variables)
        stored = np.load(folder / "optimizer.npz")
        values = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        if len(values) != len(optimizer.variables):
            raise ValueError(f"{len(values)} optimizer variables stored, {len(optimizer.variables)} expected")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)
    except (OSError, ValueError, KeyError) as error:
        raise BadInputError(
            f"cannot resume from {folder} ({error}); start without --resume or use the same network settings"
        ) from error
    return state


def _card_with_training(card_data: dict, config: TrainConfig, num_classes: int, training: dict) -> Any:
    """The caller's card with network, patch size and ``training`` filled in, validated."""
    from ..engine.card import card_from_dict

    data = json.loads(json.dumps(card_data))
    data["network"] = {"architecture": "unet3d-seed", "base_filters": config.base_filters,
                       "dropout_rate": config.dropout_rate}
    data.setdefault("input", {})["patch_size"] = list(config.patch_size)
    if len(data.get("classes", [])) != num_classes:
        raise BadInputError(f"the card names {len(data.get('classes', []))} classes but training uses {num_classes}")
    data["training"] = {**data.get("training", {}), **training}
    return card_from_dict(data, source="(training)")


def config_summary(config: TrainConfig) -> dict:
    """``config`` as JSON-ready data for the card."""
    summary = asdict(config)
    summary["patch_size"] = list(config.patch_size)
    return summary


# --------------------------------------------------------------------------------------------------
# The run


def _validation_set(sampler: PatchSampler, count: int, seed: int, batch_size: int) -> list[tuple]:
    rng = np.random.default_rng([seed, 999_983])
    pairs = [sampler.sample(rng, augment=False) for _ in range(count)]
    return [(np.stack([p[0] for p in pairs[i:i + batch_size]]), np.stack([p[1] for p in pairs[i:i + batch_size]]))
            for i in range(0, len(pairs), batch_size)]


def train(
    train_cases: Sequence[TrainingCase],
    validation_cases: Sequence[TrainingCase],
    card_data: dict,
    output: Path,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    extra_training_info: Optional[dict] = None,
) -> TrainingResult:
    """Train, validate each epoch, keep the best ``output`` (.keras) + card; return the history.

    ``card_data`` is a model-card dict (classes, channels, normalisation...) completed here with the
    network settings, patch size and a ``training`` section (config, per-epoch validation Dice).
    With no ``validation_cases``, patches of the training cases (without augmentation) are validated.
    ``cancel`` is checked before every step; a cancelled run keeps its last checkpoint and best model.
    """
    import keras
    import tensorflow as tf

    from ..engine.network import build_unet3d

    output = Path(output)
    if output.suffix != ".keras":
        raise BadInputError(f"the output model must end in .keras, got {output.name}")
    if not train_cases:
        raise BadInputError("no training cases; give at least one image/label pair")
    output.parent.mkdir(parents=True, exist_ok=True)
    num_classes = len(card_data.get("classes", []))
    in_channels = train_cases[0].image.shape[-1]
    for case in list(train_cases) + list(validation_cases):
        if case.image.shape[-1] != in_channels or case.image.shape[:3] != case.labels.shape:
            raise BadInputError(f"case {case.name}: image {case.image.shape} and labels {case.labels.shape} do not fit")
        top = int(case.labels.max(initial=0))
        if top >= num_classes:
            raise BadInputError(f"case {case.name} has label {top} but only {num_classes} classes are named")
    emit = progress or (lambda event: None)
    start_time = time.perf_counter()

    def event(stage: str, done: int, total: int, message: str, **extra: Any) -> None:
        emit({"stage": stage, "done": done, "total": total,
              "seconds": round(time.perf_counter() - start_time, 3), "message": message, **extra})

    precision = choose_precision(config.mixed_precision, config.patch_size)
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = build_unet3d(config.patch_size, in_channels, num_classes, config.base_filters, config.dropout_rate)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(model.trainable_variables)
    loss_fn = dice_ce_loss(num_classes)

    @tf.function(reduce_retracing=True)
    def train_step(images: Any, labels: Any) -> Any:
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = loss_fn(labels, probabilities)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function(reduce_retracing=True)
    def predict_step(images: Any) -> Any:
        return tf.argmax(model(images, training=False), axis=-1)

    sampler = PatchSampler(train_cases, config.patch_size, num_classes, config.foreground_probability,
                           config.augmentation)
    validation_sampler = PatchSampler(validation_cases or train_cases, config.patch_size, num_classes,
                                      config.foreground_probability)
    validation = _validation_set(validation_sampler, config.validation_patches, config.seed, config.batch_size)

    folder = checkpoint_dir(output)
    state: dict = {"epoch": 0, "history": [], "best_epoch": 0, "best_score": -1.0}
    if resume:
        if not folder.is_dir():
            raise BadInputError(f"nothing to resume: {folder} does not exist; start without --resume")
        state = _load_checkpoint(folder, model, optimizer)
    total_steps = config.epochs * config.steps_per_epoch
    names = [c.get("name", f"class {i}") for i, c in enumerate(card_data["classes"])]

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        losses = []
        for step in range(config.steps_per_epoch):
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"training cancelled in epoch {epoch}; the last checkpoint is kept in {folder}")
            global_step = (epoch - 1) * config.steps_per_epoch + step
            optimizer.learning_rate.assign(config.learning_rate * (1.0 - global_step / total_steps) ** 0.9)
            images, labels = sampler.batch(rng, config.batch_size)
            losses.append(float(train_step(tf.constant(images), tf.constant(labels))))
            if not np.isfinite(losses[-1]):
                hint = " or --mixed-precision off" if precision != "float32" else ""
                raise BadInputError(
                    f"training diverged (loss {losses[-1]}) in epoch {epoch}; lower --learning-rate{hint}"
                )
            event("train", global_step + 1, total_steps, f"epoch {epoch}/{config.epochs}",
                  epoch=epoch, loss=float(np.mean(losses)))
        counts = np.zeros((3, num_classes), dtype=np.int64)
        for images, labels in validation:
            predicted = predict_step(tf.constant(images))
            counts += class_counts(predicted.numpy(), labels, num_classes)
        dice = dice_from_counts(*counts)
        per_class = {names[i]: round(float(dice[i]), 4) for i in range(num_classes)}
        score = float(np.mean(dice[1:])) if num_classes > 1 else float(dice[0])
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "dice": per_class,
                  "mean_foreground_dice": round(score, 4), "seconds": round(time.perf_counter() - start_time, 1)}
        state["history"].append(record)
        improved = score > state["best_score"]
        if improved:
            state["best_epoch"], state["best_score"] = epoch, score
            state["best_dice"] = per_class
            training = {"config": config_summary(config), "precision": precision,
                        "best_epoch": epoch, "validation_dice": per_class,
                        "history": state["history"], **(extra_training_info or {})}
            card = _card_with_training(card_data, config, num_classes, training)
            _export(model, config, num_classes, in_channels, output)
            from ..engine.card import card_path_for_model, save_card

            save_card(card, card_path_for_model(output))
        state["epoch"] = epoch
        _save_checkpoint(folder, model, optimizer, state)
        event("validate", epoch, config.epochs,
              f"epoch {epoch}: loss {record['loss']:.3f}, Dice " +
              ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()) + (" (best)" if improved else ""),
              epoch=epoch, dice=per_class, best=improved)

    from ..engine.card import card_from_dict, card_path_for_model, load_card, save_card

    card_path = card_path_for_model(output)
    if card_path.is_file():  # the card keeps the best epoch's model but the whole run's history
        data = load_card(card_path).to_dict()
        data["training"].update(history=state["history"], epochs_run=state["epoch"],
                                training_seconds=round(time.perf_counter() - start_time, 1))
        save_card(card_from_dict(data, source=card_path.name), card_path)
    return TrainingResult(output, card_path_for_model(output), state["history"], state["best_epoch"],
                          state.get("best_dice", {}), time.perf_counter() - start_time, precision)
