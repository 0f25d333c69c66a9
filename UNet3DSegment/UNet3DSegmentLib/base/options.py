"""Every user option, declared once: name, type, default, choices or range, unit and help text.

An option is a field of one of the frozen dataclasses below (``SegmentOptions``, ``JobOptions``,
``TrainOptions``, ``WebOptions``), written with :func:`option`. The field is the declaration; every
front end derives from it:

- the command line: ``cli/arguments.py`` turns each field into an argparse argument (flag, type,
  choices, default and help);
- the child process the Slicer module and the web page start: :meth:`OptionGroup.to_argv` writes the
  flags back (only values that differ from the default);
- the Slicer panel: its parameter node takes ranges, defaults and enums (with labels) from here
  (``panel_range``, ``choice_enum``), and :meth:`OptionGroup.from_values` reads it back;
- the web page: ``web/ui.py`` builds a control per option from its kind, choices, labels and range.

Values are checked in ``__post_init__`` by :meth:`Option.check`, so a bad value gets the same
one-line error (naming the option, what is allowed and what was given) from every front end. Sizes
(``unit="bytes"``) are ints in bytes in code; text such as ``"6G"`` is parsed by ``units.parse_size``.

Adding a segment option: one field in ``SegmentOptions`` (and the engine code that uses it); for the
Slicer panel also one ``.ui`` widget and one parameter-node field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, TypeVar

from .errors import BadInputError
from .units import format_size, parse_size

T = TypeVar("T", bound="OptionGroup")
BYTES = "bytes"


@dataclass(frozen=True)
class Option:
    """The declaration of one user option (see the module docstring for who derives what from it)."""

    name: str  # Python name, snake_case; the parameter-node / keyword name is :attr:`camel`
    kind: type  # bool, int, float or str (sizes: int with unit "bytes")
    default: Any
    help: str
    choices: tuple = ()
    labels: tuple = ()  # display text of each choice, for panels (default: the choice itself)
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    maximum_exclusive: bool = False  # the range is [minimum, maximum)
    panel_maximum: Optional[float] = None  # where sliders and spin boxes end (open or exclusive ranges)
    step: Optional[float] = None  # slider step in panels
    unit: str = ""
    flag: str = ""  # command-line flag (default: --name-with-hyphens; bools that default to True: --no-name)
    metavar: Optional[str] = None
    label: str = ""  # short text for panels
    group: str = ""  # which part of a panel or command it belongs to (e.g. "runtime")
    convert: Optional[Callable[[Any], Any]] = None  # for structured values (a patch size): text or value in, value out
    # Panels show a None default (e.g. "the model card's choice") as this text at one step below the
    # minimum: a slider or spin box holds numbers only. ``from_values`` reads a value below the minimum as None.
    auto_label: str = ""

    @property
    def title(self) -> str:
        """The option as a sentence names it: ``batch size``."""
        return self.name.replace("_", " ")

    @property
    def camel(self) -> str:
        """``batch_size`` -> ``batchSize``: the Slicer parameter-node field and Python keyword name."""
        first, *rest = self.name.split("_")
        return first + "".join(part.capitalize() for part in rest)

    @property
    def cli_flag(self) -> str:
        if self.flag:
            return self.flag
        stem = self.name.replace("_", "-")
        return f"--no-{stem}" if self.kind is bool and self.default is True else f"--{stem}"

    @property
    def is_size(self) -> bool:
        return self.unit == BYTES

    def choice_label(self, value: str) -> str:
        """Display text of one choice."""
        return dict(zip(self.choices, self.labels or self.choices)).get(value, str(value))

    def panel_range(self) -> tuple[float, float]:
        """``(minimum, maximum)`` for a slider or spin box: the range, closed at ``panel_maximum``
        (with ``auto_label``: from one step below the minimum, the notch that stands for None)."""
        low = self.minimum if self.minimum is not None else 0
        if self.auto_label:
            low = round(low - (self.step or 1), 10)
        high = self.panel_maximum if self.panel_maximum is not None else self.maximum
        if high is None:
            raise ValueError(f"option {self.name} has no upper bound for a panel")
        return low, high

    def panel_default(self) -> Any:
        """The default as a panel's control holds it: a None default with ``auto_label`` is its notch."""
        if self.default is None and self.auto_label:
            return self.panel_range()[0]
        return self.default

    def from_panel(self, value: Any) -> Any:
        """A panel's number back as a value: the ``auto_label`` notch (one step below the minimum) is None;
        any other value is left to :meth:`check` (so -0.7 is still refused)."""
        if (self.auto_label and isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isclose(float(value), self.panel_range()[0], abs_tol=1e-9)):
            return None
        return value

    # --- values -------------------------------------------------------------------------------
    def check(self, value: Any) -> Any:
        """``value`` as this option's type if allowed, else BadInputError naming the option and the range."""
        if value is None:
            if self.default is None:
                return None
            raise BadInputError(f"{self.title} must be given, got None")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise BadInputError(f"{self.title} must be true or false, got {value!r}")
        if self.convert is not None:
            return self.convert(value)
        if self.choices:
            text = str(getattr(value, "value", value)).lower()  # enums of the panel carry the value
            if text not in self.choices:
                raise BadInputError(f"{self.title} must be one of {', '.join(self.choices)}, got {value!r}")
            return text
        if self.kind is str:
            return str(value)
        return self._check_number(value)

    def _check_number(self, value: Any) -> Any:
        if self.is_size and isinstance(value, str):
            value = parse_size(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            raise BadInputError(f"{self.title} must be a number, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise BadInputError(f"{self.title} must be an integer{self._range_text()}, got {value!r}")
            number: Any = int(value)
        else:
            number = float(value)
            if math.isnan(number):
                raise BadInputError(f"{self.title} must be a number{self._range_text()}, got {value!r}")
        too_low = self.minimum is not None and number < self.minimum
        too_high = self.maximum is not None and (
            number >= self.maximum if self.maximum_exclusive else number > self.maximum)
        if too_low or too_high:
            raise BadInputError(f"{self.title} must be{self._range_text()}, got {value}")
        return number

    def _range_text(self) -> str:
        if self.is_size:
            return f" at least {format_size(self.minimum)}" if self.minimum and self.minimum > 1 else ""
        low = "" if self.minimum is None else f" >= {self.minimum:g}"
        if self.maximum is None:
            return low
        high = f" {'<' if self.maximum_exclusive else '<='} {self.maximum:g}"
        return f"{low} and{high}" if low else high

    def parse(self, text: str) -> Any:
        """A value from command-line or text-field text (sizes such as ``6G``; empty: the default)."""
        if self.kind is bool:
            raise ValueError(f"option {self.name} is a switch and takes no text")
        text = str(text).strip()
        if text == "" and self.default is None:
            return None
        if self.is_size:
            return self.check(parse_size(text))
        if self.kind in (int, float) and not self.choices and self.convert is None:
            try:
                number = self.kind(text)
            except ValueError as error:
                raise BadInputError(f"{self.title} must be {'an integer' if self.kind is int else 'a number'}"
                                    f"{self._range_text()}, got {text!r}") from error
            return self.check(number)
        return self.check(text)

    def format(self, value: Any) -> str:
        """Command-line text for ``value`` (the inverse of :meth:`parse`)."""
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        return str(value)


def option(default: Any, help: str, **spec: Any) -> Any:
    """Declare a dataclass field as a user option (type from the annotation, name from the field)."""
    return dataclasses.field(default=default, metadata={"option": (default, help, spec)})


class OptionGroup:
    """Base of the option dataclasses: the options they declare, checks, and conversions."""

    OPTIONS: ClassVar[dict[str, Option]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.OPTIONS = {}  # filled by declares() once the dataclass decorator has run

    def __post_init__(self) -> None:
        for name, declared in self.OPTIONS.items():
            object.__setattr__(self, name, declared.check(getattr(self, name)))

    @classmethod
    def spec(cls, name: str) -> Option:
        """The declaration of option ``name`` (snake_case or camelCase)."""
        found = cls.OPTIONS.get(name) or next((o for o in cls.OPTIONS.values() if o.camel == name), None)
        if found is None:
            raise BadInputError(f"unknown option {name!r}; known: {', '.join(cls.OPTIONS)}")
        return found

    @classmethod
    def options(cls, only: Optional[Iterable[str]] = None, group: Optional[str] = None) -> list[Option]:
        """The declarations, in field order; ``only`` names some, ``group`` picks one group."""
        chosen = [cls.spec(n) for n in only] if only is not None else list(cls.OPTIONS.values())
        return [o for o in chosen if group is None or o.group == group]

    @classmethod
    def from_values(cls: type[T], values: Mapping[str, Any], base: Optional[T] = None) -> T:
        """``base`` (default: all defaults) with ``values`` applied; names in snake_case or camelCase.

        Text for numbers and sizes (a panel's text field, ``"6G"``) is parsed; enum members give their
        value; an empty text for an option without default means "not set".
        """
        changed = {}
        for key, value in values.items():
            declared = cls.spec(key)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, str) and declared.kind is not str:
                value = declared.parse(value)
            changed[declared.name] = value
        return dataclasses.replace(base if base is not None else cls(), **changed)

    def changed(self) -> dict[str, Any]:
        """Options whose value differs from the declared default."""
        return {n: getattr(self, n) for n, o in self.OPTIONS.items() if getattr(self, n) != o.default}

    def to_argv(self) -> list[str]:
        """Command-line flags for the values that differ from the defaults (the child's argv)."""
        argv: list[str] = []
        for name, value in self.changed().items():
            declared = self.OPTIONS[name]
            if declared.kind is bool:
                argv.append(declared.cli_flag)  # the flag flips the default
            else:
                argv += [declared.cli_flag, declared.format(value)]
        return argv


def declares(cls: type[T]) -> type[T]:
    """Class decorator (after ``@dataclass``): build ``cls.OPTIONS`` from the fields made by :func:`option`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "option" not in field.metadata:
            continue
        default, help_text, spec = field.metadata["option"]
        kind = spec.pop("kind", None) or _plain_type(hints[field.name])
        cls.OPTIONS[field.name] = Option(field.name, kind, default, help_text, **spec)
    return cls


def _plain_type(hint: Any) -> type:
    """``Optional[int]`` -> ``int``."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint


def choice_enum(declared: Option, class_name: str) -> type[enum.Enum]:
    """An Enum of the option's choices (member ``FP32`` has value ``"fp32"``) whose ``label()`` is the panel text.

    Slicer's parameter-node wrapper stores enum members and fills a combo box from ``label()``.
    """
    members = {value.upper().replace("-", "_"): value for value in declared.choices}
    made = enum.Enum(class_name, members)
    labels = dict(zip(declared.choices, declared.labels or declared.choices))
    made.label = lambda self: labels[self.value]  # type: ignore[attr-defined]
    return made


def patch_size(value: Any) -> tuple[int, int, int]:
    """``"64"``, ``"32,64,64"``, ``"32x64x64"`` or a sequence -> ``(z, y, x)``, each a multiple of 8."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError) as error:
        raise BadInputError(f"patch must be one or three multiples of 8 (z,y,x), got {value!r}") from error
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p < 8 or p % 8 for p in parts):
        raise BadInputError(f"patch must be one or three multiples of 8 (z,y,x), got {value!r}")
    return (parts[0], parts[1], parts[2])


# ---------------------------------------------------------------------------------------------------
# The options
# ---------------------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("tensorflow", "torch", "jax")
DEFAULT_OVERLAP = 0.5  # tile overlap when neither the user nor the model card gives one
PROGRESS_MODES = ("bar", "json", "none")
NORMALIZATIONS = ("zscore-nonzero", "percentile-zscore", "window", "none")


@declares
@dataclass(frozen=True)
class SegmentOptions(OptionGroup):
    """How ``segment`` runs: the sliding window, post-processing and the runtime (device, precision...)."""

    overlap: Optional[float] = option(
        None, f"tile overlap in [0, 1) (default: the model card's inference.overlap, else {DEFAULT_OVERLAP:g})",
        kind=float, minimum=0.0, maximum=1.0, maximum_exclusive=True, panel_maximum=0.95, step=0.05,
        label="Overlap", auto_label="Model's choice")
    batch_size: int = option(2, "patches per model call", minimum=1, panel_maximum=64, label="Batch size")
    blend: str = option("gaussian", "how overlapping tiles are weighed", choices=("gaussian", "constant"),
                        labels=("Gaussian", "Constant"), label="Blending")
    skip_empty: bool = option(True, "skip tiles whose input is all zero (the background around a cropped, "
                              "skull-stripped brain): the model does not run on them and they count as "
                              "background", label="Skip empty tiles")
    tta: bool = option(False, "mirror test-time augmentation (8x slower)",
                       label="Test-time augmentation (mirroring, 8x slower)")
    largest_component: bool = option(False, "keep only the largest connected component of each class",
                                     label="Keep the largest component per class")
    device: str = option("auto", "where the model runs (auto: a GPU when the framework sees one)", choices=DEVICES,
                         labels=("Automatic (GPU if available)", "CPU", "GPU"), label="Device", group="runtime")
    gpu_index: Optional[int] = option(None, "which GPU to use on a machine with several (default 0)", kind=int,
                                      minimum=0, flag="--gpu", metavar="N", group="runtime")
    threads: Optional[int] = option(None, "CPU threads (default: all cores)", kind=int, minimum=1, group="runtime")
    precision: str = option("auto", "arithmetic of the network (auto: bf16 on GPUs and on CPUs with "
                            "AVX512-BF16/AMX, else fp32); the softmax output stays float32", choices=PRECISIONS,
                            labels=("Automatic", "float32", "bfloat16", "float16"), label="Precision",
                            group="runtime")
    backend: str = option("tensorflow", "Keras backend that runs the model (torch and jax are optional installs)",
                          choices=BACKENDS, labels=("TensorFlow", "PyTorch", "JAX"), label="Framework",
                          group="runtime")
    accumulation: str = option("float32", "dtype of the blended class sums (float16 halves that buffer)",
                               choices=("float32", "float16"), group="runtime")
    blend_on: str = option("auto", "where overlapping tiles are blended: on the model's device (sums kept there, "
                           "only the labelmap copied back; fastest on a GPU) or on the host in z slabs (least "
                           "memory); auto: the device when the model runs on a GPU",
                           choices=("auto", "host", "device"), group="runtime")
    max_memory: Optional[int] = option(
        None, "budget such as 4G or 512M for the full-volume probability arrays, needed only to resample or "
        "write probabilities (default: half the machine's memory); above it the labelmap is resampled instead. "
        "Host blending always works in z slabs", kind=int, unit=BYTES, minimum=1, metavar="SIZE", group="runtime")
    gpu_memory_limit: Optional[int] = option(
        None, "most GPU memory this run may take, such as 6G (tensorflow and torch backends; default: what it "
        "needs). Beyond it the run retries with smaller batches, then on the CPU", kind=int, unit=BYTES,
        minimum=2 ** 20, metavar="SIZE", label="GPU memory limit", group="runtime")
    trust_model: bool = option(
        False, "load a TensorFlow SavedModel even if it holds operations beyond pure tensor maths (file "
        "reads and writes, printing, datasets...). A SavedModel is a program: this lets it act on this "
        "machine with your rights. Only for models from a source you trust; never offered by the web page",
        label="Trust this model (SavedModel may run file operations)")

    def window_overlap(self, recommended: Optional[float] = None) -> float:
        """The overlap a run uses: the user's, else the model card's ``recommended``, else 0.5."""
        if self.overlap is not None:
            return self.overlap
        return recommended if recommended is not None else DEFAULT_OVERLAP


@declares
@dataclass(frozen=True)
class JobOptions(OptionGroup):
    """Options of a command's job rather than of the segmentation: model, outputs, progress display."""

    model: Optional[str] = option(None, "model .keras/.h5/SavedModel folder (default: bundled demo model)", kind=str,
                                  metavar="PATH")
    overwrite: bool = option(False, "replace existing output files")
    progress: str = option("bar", "progress display: terminal bar, JSON lines on stdout, or none",
                           choices=PROGRESS_MODES)
    statistics: Optional[str] = option(
        None, "also write per-class figures to this .csv or .json file: voxels, volume in mL, mean and standard "
        "deviation of each input channel inside the class, mean model confidence", kind=str, metavar="PATH")


BATCH_ENGINES = ("local", "ray")
BATCH_FORMATS = ("seg.nrrd", "nrrd", "nii.gz", "mha", "dicom-seg")


@declares
@dataclass(frozen=True)
class BatchOptions(OptionGroup):
    """``batch``: how a cohort is spread over workers and what each case's output file is."""

    engine: str = option("local", "where the cases run: worker processes on this machine, or a Ray cluster "
                         "(pip install 'unet3dsegment[ray]')", choices=BATCH_ENGINES)
    address: Optional[str] = option(None, "Ray cluster to join, such as ray://head:10001 or auto (default: start "
                                    "a local Ray instance); inputs and outputs must be on a filesystem every "
                                    "node sees", kind=str, metavar="ADDR")
    workers: int = option(1, "worker processes (local) or Ray actors, each holding one loaded model", minimum=1)
    gpus_per_worker: float = option(0.0, "GPUs each Ray actor reserves (a fraction shares one GPU)", minimum=0.0)
    format: str = option("seg.nrrd", "file format of each case's output OUTDIR/<case>.<format> (dicom-seg: "
                         "<case>.dcm, a DICOM SEG, for DICOM series cases; needs unet3dsegment[dicom])",
                         choices=BATCH_FORMATS)


@declares
@dataclass(frozen=True)
class TrainOptions(OptionGroup):
    """``train``: the network, the data's description when no card is given, and the training loop."""

    card: Optional[str] = option(None, "model card to start from (channels, classes, spacing, normalisation)",
                                 kind=str)
    classes: Optional[str] = option(None, "comma-separated class names, background first (default: from --card, "
                                    "else Background, Class 1.. up to the highest label)", kind=str)
    channels: str = option("image", "comma-separated channel names")
    spacing: str = option("native", "'native' or x,y,z mm to resample to")
    normalization: str = option("zscore-nonzero", "intensity normalisation; use --card for 'window'",
                                choices=tuple(n for n in NORMALIZATIONS if n != "window"))
    crop_to_nonzero: bool = option(False, "crop inputs to their non-zero box")
    patch: tuple = option((64, 64, 64), "patch size z,y,x or one side, multiples of 8", convert=patch_size)
    base_filters: int = option(16, "filters of the first level (seed: 32)", minimum=1)
    epochs: int = option(20, "training epochs", minimum=1)
    steps_per_epoch: int = option(50, "training steps per epoch", minimum=1)
    batch_size: int = option(1, "patches per training step", minimum=1)
    learning_rate: float = option(1e-3, "Adam learning rate", minimum=0.0)
    validation_fraction: float = option(0.2, "share of cases held out for validation", minimum=0.0, maximum=1.0,
                                        maximum_exclusive=True)
    validation_patches: int = option(8, "patches per validation case", minimum=1)
    foreground_probability: float = option(0.67, "share of patches centred on a foreground voxel", minimum=0.0,
                                           maximum=1.0)
    augmentation: bool = option(True, "flips, rotations and intensity changes (--no-augmentation: none)")
    seed: int = option(0, "random seed (same seed, same run)")
    mixed_precision: str = option("auto", "bfloat16 compute (auto: where the CPU or GPU supports it)",
                                  choices=("auto", "on", "off"))
    resume: bool = option(False, "continue from OUTPUT's .checkpoint/ folder")


@declares
@dataclass(frozen=True)
class WebOptions(OptionGroup):
    """``web``: where the page is served and what it accepts."""

    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = option(8080, "port (0: any free port)", minimum=0, maximum=65535)
    max_upload_mb: float = option(512.0, "largest volume file accepted from the browser", unit="MB",
                                  minimum=1.0)
    demo_downsample: int = option(1, "load the demo MRI block-averaged by this factor (tests, slow machines)",
                                  minimum=1)
    models_dir: Optional[str] = option(None, "folder whose .keras/.h5 files and SavedModel folders the page may "
                                       "choose from (besides the bundled model and --model)", kind=str,
                                       metavar="FOLDER")
