"""The options schema: each option declared once, and every front end derived from the declaration."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from UNet3DSegmentLib.base.errors import BadInputError
from UNet3DSegmentLib.base.options import JobOptions, SegmentOptions, TrainOptions, WebOptions
from UNet3DSegmentLib.cli.arguments import add_options, options_from_args
from UNet3DSegmentLib.cli.main import build_parser
from UNet3DSegmentLib.client import install, panel_options


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", ["segment"])
def test_segment_has_one_flag_per_declared_option_with_its_default_and_choices(command: str) -> None:
    flags = flags_of(subcommand(command))
    for declared in list(SegmentOptions.OPTIONS.values()) + list(JobOptions.OPTIONS.values()):
        action = flags[declared.cli_flag]
        assert action.dest == declared.name
        assert action.default == declared.default
        assert tuple(action.choices or ()) == declared.choices
    assert flags["--gpu"].dest == "gpu_index"  # the documented flag name is kept


def test_train_and_web_flags_come_from_their_declarations() -> None:
    train = flags_of(subcommand("train"))
    for declared in TrainOptions.OPTIONS.values():
        assert train[declared.cli_flag].default == declared.default, declared.name
    assert train["--no-augmentation"].dest == "augmentation"
    assert train["--patch"].default == (64, 64, 64)
    web = flags_of(subcommand("web"))
    assert {o.cli_flag for o in WebOptions.OPTIONS.values()} <= set(web)


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"overlap": 0.75, "batch_size": 8, "blend": "constant", "tta": True, "largest_component": True},
        {"device": "cpu", "gpu_index": 3, "threads": 2, "precision": "fp16", "backend": "torch"},
        {"accumulation": "float16", "max_memory": "1.5G", "gpu_memory_limit": 3 * 2**30},
    ],
)
def test_to_argv_and_the_command_line_round_trip(values: dict) -> None:
    """What the Slicer module and the web page send is what the engine parses back."""
    options = SegmentOptions.from_values(values)
    args = subcommand("segment").parse_args(["in.nrrd", "-o", "out.nrrd", *options.to_argv()])
    assert options_from_args(args, SegmentOptions) == options
    assert len(options.to_argv()) >= len(values)  # every changed value is sent


def test_from_values_takes_camel_case_text_and_enums_and_keeps_the_rest() -> None:
    base = SegmentOptions(overlap=0.25)
    options = SegmentOptions.from_values(
        {"batchSize": "4", "gpuMemoryLimit": "6G", "device": panel_options.Device("cpu"), "max_memory": ""}, base)
    assert (options.overlap, options.batch_size, options.device) == (0.25, 4, "cpu")
    assert (options.gpu_memory_limit, options.max_memory) == (6 * 2**30, None)
    with pytest.raises(BadInputError, match=r"^unknown option 'overlapp'; known: overlap, batch_size"):
        SegmentOptions.from_values({"overlapp": 0.5})
    with pytest.raises(BadInputError, match=r"^batch size must be an integer >= 1, got 'four'$"):
        SegmentOptions.from_values({"batchSize": "four"})


def test_a_bad_value_is_an_argparse_error_with_the_options_own_message(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        subcommand("segment").parse_args(["in.nrrd", "-o", "o.nrrd", "--overlap", "1.5"])
    assert caught.value.code == 2
    assert "argument --overlap: overlap must be >= 0 and < 1, got 1.5" in capsys.readouterr().err


def test_add_options_only_and_overrides() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser, SegmentOptions, only=["tta", "overlap"], tta={"help": "counted"})
    actions = flags_of(parser)
    assert set(actions) == {"--tta", "--overlap"} and actions["--tta"].help == "counted"
    assert actions["--overlap"].help.endswith("(default: the model card's inference.overlap, else 0.5)")
    assert actions["--overlap"].default is None


def test_overlap_defaults_to_the_card_then_one_half_and_panels_show_the_model_choice_notch() -> None:
    assert SegmentOptions().overlap is None
    assert SegmentOptions().window_overlap(None) == 0.5 and SegmentOptions().window_overlap(0.25) == 0.25
    assert SegmentOptions(overlap=0.75).window_overlap(0.25) == 0.75  # the user's value wins
    assert SegmentOptions(overlap=0.0).window_overlap(0.25) == 0.0  # 0 is a value, not "unset"
    assert panel_options.panel_range("overlap") == (-0.05, 0.95)
    assert panel_options.default("overlap") == -0.05
    overlap = SegmentOptions.spec("overlap")
    assert overlap.from_panel(-0.05) is None and overlap.from_panel(0.0) == 0.0  # only the notch is None
    assert overlap.from_panel(-0.7) == -0.7  # any other value is left to the check
    panel = SimpleNamespace(overlap=-0.05, batchSize=2)
    assert panel_options.options_from_parameters(panel).overlap is None
    with pytest.raises(BadInputError, match=r"^overlap must be >= 0 and < 1, got -0.7$"):
        panel_options.options_from_parameters(SimpleNamespace(overlap=-0.7))
    with pytest.raises(BadInputError, match=r"^overlap must be >= 0 and < 1, got -0.05$"):
        SegmentOptions.from_values({"overlap": -0.05})  # Python callers give a number or None, no notch
    assert SegmentOptions().to_argv() == [] and SegmentOptions(overlap=0.5).to_argv() == ["--overlap", "0.5"]
    with pytest.raises(BadInputError, match=r"^overlap must be >= 0 and < 1, got -0.05$"):
        SegmentOptions(overlap=-0.05)  # only panels have the notch


def test_the_ui_names_the_model_choice_as_the_option_declares_it() -> None:
    """The .ui's specialValueText is the declared auto label (one wording, checked)."""
    import re
    from pathlib import Path

    ui = (Path(__file__).resolve().parent.parent / "UNet3DSegment" / "Resources" / "UI" / "UNet3DSegment.ui").read_text()
    texts = re.findall(r'<property name="specialValueText">\s*<string>([^<]*)</string>', ui)
    assert texts == [SegmentOptions.spec("overlap").auto_label.replace("'", "&apos;")] or texts == [
        SegmentOptions.spec("overlap").auto_label]


# --- the Slicer panel -------------------------------------------------------------------------------
def test_panel_enums_carry_values_and_labels_from_the_schema() -> None:
    assert [e.value for e in panel_options.Device] == ["auto", "cpu", "gpu"]
    assert [e.label() for e in panel_options.Backend] == ["TensorFlow", "PyTorch", "JAX"]
    assert panel_options.default("precision") is panel_options.Precision.AUTO
    assert panel_options.panel_range("batch_size") == (1, 64)
    assert panel_options.choiceEnum("blend")("constant").label() == "Constant"
    assert panel_options.default("blend") is panel_options.choiceEnum("blend").GAUSSIAN


def test_options_from_parameters_reads_every_declared_field_the_node_has() -> None:
    node = SimpleNamespace(overlap=0.3, batchSize=6, tta=True, largestComponent=False,
                           blend=panel_options.choiceEnum("blend").CONSTANT,
                           device=panel_options.Device.GPU, precision=panel_options.Precision.BF16,
                           backend=panel_options.Backend.JAX, gpuMemoryLimit=" 2G ", pythonExecutable="")
    options = panel_options.options_from_parameters(node)
    assert options == SegmentOptions(overlap=0.3, batch_size=6, blend="constant", tta=True, device="gpu", precision="bf16",
                                     backend="jax", gpu_memory_limit=2 * 2**30)
    node.gpuMemoryLimit = "plenty"
    with pytest.raises(BadInputError, match="memory size 'plenty' is not a size"):
        panel_options.options_from_parameters(node)


# --- installing what the engine lacks, on each Slicer line --------------------------------------------
def test_install_uses_pip_ensure_on_slicer_5_12_and_pip_install_before(tmp_path) -> None:
    calls = []
    install.install_requirements(["tensorflow>=2.16"], lambda args: calls.append(("pip_install", args)), None)
    assert calls[0][0] == "pip_install" and calls[0][1][0] == "-c" and calls[0][1][2:] == ["tensorflow>=2.16"]

    calls.clear()

    def pip_ensure(requirements, **kwargs):
        calls.append(("pip_ensure", requirements, kwargs))

    install.install_requirements(["keras>=3", "torch"], lambda args: calls.append(("pip_install", args)), pip_ensure,
                                 skip_in_testing=False)
    assert [c[0] for c in calls] == ["pip_ensure"]
    assert calls[0][1] == ["keras>=3", "torch"]
    assert calls[0][2]["requester"] == "UNet3DSegment" and calls[0][2]["skip_in_testing"] is False


def test_dependency_plan_asks_for_slicers_python_and_refuses_elsewhere(monkeypatch) -> None:
    from UNet3DSegmentLib.client import dependencies

    monkeypatch.setattr(dependencies, "missing_modules", lambda python, modules, env=None: ["torch"])
    ask = install.plan_dependencies(None, "torch")
    assert (ask.action, ask.requirements) == ("ask", ["torch"]) and "Install now?" in ask.message
    testing = install.plan_dependencies(None, "torch", testing=True)
    assert testing.action == "refuse" and testing.message.endswith("not installing during tests")
    own = install.plan_dependencies("/envs/gpu/bin/python", "torch")
    assert own.action == "refuse" and '"/envs/gpu/bin/python" -m pip install torch' in own.message
    monkeypatch.setattr(dependencies, "missing_modules", lambda python, modules, env=None: [])
    assert install.plan_dependencies(None, "tensorflow").action == "ready"


def test_the_card_knows_exactly_the_declared_normalisation_methods() -> None:
    from UNet3DSegmentLib.base.options import NORMALIZATIONS
    from UNet3DSegmentLib.engine.card import NORMALIZATION_PARAMETERS

    assert tuple(NORMALIZATION_PARAMETERS) == NORMALIZATIONS  # one list; the card adds each method's parameters
    assert TrainOptions.spec("normalization").choices == tuple(m for m in NORMALIZATIONS if m != "window")
