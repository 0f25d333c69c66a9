"""EngineProcess against a stand-in child: JSON-lines events, exit codes -> error kinds, tree cancel.

The stand-in is a small Python script (no TensorFlow) that behaves like the engine's command line:
it prints progress lines, noise, errors, exits with the engine's codes, and can start a grandchild,
so that cancelling is checked on a real process tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from UNet3DSegmentLib.base.options import SegmentOptions
from UNet3DSegmentLib.client.engine_process import (
    MODULE_DIR,
    EngineProcess,
    engine_environment,
    error_for_exit,
    segment_command,
)
from UNet3DSegmentLib.base.errors import (
    BadInputError,
    BadModelError,
    CancelledError,
    OutOfMemoryError,
    UNet3DSegmentError,
)

STAND_IN = textwrap.dedent(
    r'''
    import json, os, signal, subprocess, sys, time

    def emit(**event):
        print(json.dumps(event, ensure_ascii=False), flush=True)

    mode = sys.argv[1]
    if mode == "ok":
        print("some library chatter on stdout", flush=True)
        emit(stage="load", done=0, total=0, seconds=0.0, message="reading")
        for done in range(1, 4):
            emit(stage="inference", done=done, total=3, seconds=0.01 * done, message=f"patch {done}/3")
        print("warning: something on stderr", file=sys.stderr, flush=True)
        emit(stage="done", done=3, total=3, seconds=0.05, message="", output=sys.argv[2])
        sys.exit(0)
    if mode == "fail":
        code, kind, message = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        emit(stage="inference", done=1, total=9, seconds=0.1, message="patch 1/9")
        emit(stage="error", done=0, total=0, seconds=0.2, kind=kind, message=message, exit_code=code)
        print("unet3d-segment: error: " + message, file=sys.stderr, flush=True)
        sys.exit(code)
    if mode == "stderr-only":
        print("Traceback (most recent call last):\n  File 'x.py'\nValueError: boom at the end",
              file=sys.stderr, flush=True)
        sys.exit(int(sys.argv[2]))
    if mode == "no-output":
        emit(stage="load", done=0, total=0, seconds=0.0, message="reading")
        sys.exit(0)
    if mode == "killed":
        emit(stage="inference", done=1, total=5, seconds=0.1, message="patch 1/5")
        os.kill(os.getpid(), signal.SIGKILL)
    if mode in ("tree", "stubborn", "graceful"):
        pid_file = sys.argv[2]
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode == "graceful":
            def on_term(signum, frame):
                emit(stage="error", done=0, total=0, seconds=1.0, kind="cancelled",
                     message="cancelled; nothing was written", exit_code=5)
                sys.exit(5)
            signal.signal(signal.SIGTERM, on_term)
        grandchild_code = "import signal, time\n"
        if mode == "stubborn":
            grandchild_code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        grandchild_code += "time.sleep(600)\n"
        grandchild = subprocess.Popen([sys.executable, "-c", grandchild_code])
        emit(stage="inference", done=1, total=100, seconds=0.1, message="patch 1/100")
        with open(pid_file + ".tmp", "w") as f:  # the test cancels once this file appears
            f.write(f"{os.getpid()} {grandchild.pid}")
        os.replace(pid_file + ".tmp", pid_file)
        while True:
            time.sleep(0.05)
    raise SystemExit(f"unknown mode {mode}")
    '''
)


@pytest.fixture()
def stand_in(tmp_path: Path) -> Path:
    path = tmp_path / "stand_in_engine.py"
    path.write_text(STAND_IN)
    return path


def run_to_end(process: EngineProcess, timeout: float = 20.0) -> list[dict]:
    """Drain events the way the Slicer QTimer does, until the child is finished."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not process.finished:
        events += process.poll()
        assert time.monotonic() < deadline, "stand-in child did not finish"
        time.sleep(0.01)
    return events + process.poll()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for_pids(pid_file: Path, timeout: float = 10.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_file.exists() and len(pid_file.read_text().split()) == 2:
            child, grandchild = (int(p) for p in pid_file.read_text().split())
            return child, grandchild
        time.sleep(0.01)
    raise AssertionError("stand-in did not start its grandchild")


def test_events_arrive_in_order_and_output_is_reported(stand_in: Path, tmp_path: Path) -> None:
    output = tmp_path / "résultat.nrrd"  # non-ASCII path travels through the JSON line
    process = EngineProcess.start([sys.executable, str(stand_in), "ok", str(output)])
    events = run_to_end(process)
    assert [e["stage"] for e in events] == ["load", "inference", "inference", "inference", "done"]
    assert [e["done"] for e in events if e["stage"] == "inference"] == [1, 2, 3]
    assert process.returncode == 0
    assert process.error() is None
    assert process.output == output
    assert process.stderr_tail == ["some library chatter on stdout", "warning: something on stderr"]
    assert process.poll() == []  # drained


@pytest.mark.parametrize(
    ("code", "kind", "error_type"),
    [
        (3, "bad-input", BadInputError),
        (4, "bad-model", BadModelError),
        (6, "out-of-memory", OutOfMemoryError),
        (1, "internal", UNet3DSegmentError),
    ],
)
def test_exit_code_maps_to_error_kind_with_childs_message(
    stand_in: Path, code: int, kind: str, error_type: type
) -> None:
    message = f"input volume µ{code} is   empty; choose another"
    process = EngineProcess.start([sys.executable, str(stand_in), "fail", str(code), kind, message])
    events = run_to_end(process)
    assert events[-1]["stage"] == "error" and events[-1]["exit_code"] == code
    error = process.error()
    assert type(error) is error_type
    assert str(error) == f"input volume µ{code} is empty; choose another"  # one line, spaces collapsed
    assert error.exit_code == code


def test_without_error_event_the_last_stderr_line_is_the_message(stand_in: Path) -> None:
    process = EngineProcess.start([sys.executable, str(stand_in), "stderr-only", "4"])
    run_to_end(process)
    error = process.error()
    assert type(error) is BadModelError
    assert str(error) == "ValueError: boom at the end"


def test_success_without_done_event_is_an_error(stand_in: Path) -> None:
    process = EngineProcess.start([sys.executable, str(stand_in), "no-output"])
    run_to_end(process)
    assert process.returncode == 0
    assert type(process.error()) is UNet3DSegmentError
    assert "without reporting its output" in str(process.error())


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_killed_child_is_reported_with_the_signal(stand_in: Path) -> None:
    process = EngineProcess.start([sys.executable, str(stand_in), "killed"])
    run_to_end(process)
    assert process.returncode == -9
    error = process.error()
    assert type(error) is UNet3DSegmentError
    assert str(error) == ("the engine was killed (most likely out of memory): the engine process was ended by "
                          "SIGKILL; try a smaller batch size, the CPU device, or a smaller overlap or volume")


@pytest.mark.parametrize("mode", ["tree", "stubborn", "graceful"])
def test_cancel_ends_the_whole_tree(stand_in: Path, tmp_path: Path, mode: str) -> None:
    pid_file = tmp_path / f"{mode}.pids"
    process = EngineProcess.start([sys.executable, str(stand_in), mode, str(pid_file)])
    child, grandchild = wait_for_pids(pid_file)
    assert not gone(child) and not gone(grandchild)
    start = time.monotonic()
    grace = 3.0 if mode == "graceful" else 0.5  # generous where the child is expected to exit by itself
    process.cancel(grace_seconds=grace)
    elapsed = time.monotonic() - start
    assert gone(child)
    deadline = time.monotonic() + 5.0
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(grandchild), "grandchild survived the cancel"
    assert process.finished and process.cancelled
    assert type(process.error()) is CancelledError
    if mode == "stubborn":
        assert 0.5 <= elapsed < 15.0  # SIGTERM ignored: SIGKILL after the grace period (upper bound: a loaded CI machine)
        assert process.returncode == -9
    elif mode == "graceful":
        assert elapsed < grace and process.returncode == 5
        assert process.last_error["kind"] == "cancelled"
    else:
        assert process.returncode == -15


@pytest.mark.parametrize("mode", ["stubborn", "graceful"])
def test_request_cancel_returns_at_once_and_polling_finishes_the_job(stand_in: Path, tmp_path: Path,
                                                                     mode: str) -> None:
    """The GUI's way: ask, keep polling from the timer; SIGKILL follows from poll() after the grace time."""
    pid_file = tmp_path / f"{mode}.pids"
    process = EngineProcess.start([sys.executable, str(stand_in), mode, str(pid_file)])
    child, grandchild = wait_for_pids(pid_file)
    start = time.monotonic()
    grace = 3.0 if mode == "graceful" else 0.5
    process.request_cancel(grace_seconds=grace)
    assert time.monotonic() - start < 1.0  # returns at once (the grace period is longer)
    events = run_to_end(process)
    elapsed = time.monotonic() - start
    assert gone(child)
    deadline = time.monotonic() + 5.0
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(grandchild)
    assert type(process.error()) is CancelledError
    if mode == "stubborn":
        assert 0.5 <= elapsed < 5.0 and process.returncode == -9
    else:
        assert elapsed < grace and process.returncode == 5 and events[-1]["kind"] == "cancelled"


def test_cancel_after_the_end_keeps_the_result(stand_in: Path, tmp_path: Path) -> None:
    process = EngineProcess.start([sys.executable, str(stand_in), "ok", str(tmp_path / "out.nrrd")])
    run_to_end(process)
    process.cancel(grace_seconds=0.1)
    assert not process.cancelled and process.error() is None


def test_missing_interpreter_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not found; choose an existing interpreter"):
        EngineProcess.start([str(tmp_path / "no-such-python"), "-m", "UNet3DSegmentLib"])


def test_wait_times_out_then_returns_the_code(stand_in: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "wait.pids"
    process = EngineProcess.start([sys.executable, str(stand_in), "tree", str(pid_file)])
    wait_for_pids(pid_file)
    assert process.wait(timeout=0.05) is None
    process.cancel(grace_seconds=0.5)
    assert process.wait(timeout=1.0) == -15


def test_segment_command_lists_only_chosen_options() -> None:
    command = segment_command("/py", ["/in/t1.nrrd", "/in/t2.nrrd"], "/out/seg.nrrd")
    assert command == ["/py", "-m", "UNet3DSegmentLib", "segment", "/in/t1.nrrd", "/in/t2.nrrd",
                       "-o", "/out/seg.nrrd", "--progress", "json"]
    options = SegmentOptions(overlap=0.25, batch_size=4, blend="constant", tta=True, device="GPU",
                             precision="bf16", largest_component=True)
    command = segment_command("/py", ["/in/t1.nrrd"], "/o.nrrd", model="/m/model.keras", options=options,
                              extra_arguments=("--threads", 1))
    assert command[4:] == ["/in/t1.nrrd", "-o", "/o.nrrd", "--model", "/m/model.keras", "--overlap", "0.25",
                           "--batch-size", "4", "--blend", "constant", "--tta", "--largest-component",
                           "--device", "gpu", "--precision", "bf16", "--threads", "1", "--progress", "json"]


def test_speed_and_device_options_become_engine_flags() -> None:
    options = SegmentOptions(backend="torch", gpu_index=1, gpu_memory_limit="6G", max_memory=" 4G",
                             accumulation="float16")
    command = segment_command("/py", ["/in/t1.nrrd"], "/o.nrrd", options=options)
    assert command[7:-2] == ["--gpu", "1", "--backend", "torch", "--accumulation", "float16",
                             "--max-memory", str(4 * 2**30), "--gpu-memory-limit", str(6 * 2**30)]
    assert "--backend" not in segment_command("/py", ["/in.nrrd"], "/o.nrrd", options=SegmentOptions())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "mxnet"}, "backend must be one of tensorflow, torch, jax, got 'mxnet'"),
        ({"gpu_index": -1}, "gpu index must be >= 0, got -1"),
        ({"gpu_memory_limit": "lots"}, "memory size 'lots' is not a size such as 4G, 512M or 1.5GiB"),
        ({"gpu_memory_limit": 5}, "gpu memory limit must be at least 1 MiB, got 5"),
        ({"accumulation": "int8"}, "accumulation must be one of float32, float16, got 'int8'"),
        ({"overlap": 1.0}, "overlap must be >= 0 and < 1, got 1.0"),
        ({"batch_size": 0}, "batch size must be >= 1, got 0"),
        ({"batch_size": 2.5}, "batch size must be an integer >= 1, got 2.5"),
        ({"device": "tpu"}, "device must be one of auto, cpu, gpu, got 'tpu'"),
        ({"precision": "int8"}, "precision must be one of auto, fp32, bf16, fp16, got 'int8'"),
        ({"tta": "yes"}, "tta must be true or false, got 'yes'"),
    ],
)
def test_bad_options_are_bad_input_naming_the_option(values: dict, message: str) -> None:
    with pytest.raises(BadInputError) as caught:
        SegmentOptions(**values)
    assert str(caught.value) == message


def test_no_input_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="no input volume"):
        segment_command("/py", [], "/o.nrrd")


def test_environment_puts_the_engine_first_on_pythonpath() -> None:
    env = engine_environment({"PYTHONPATH": os.pathsep.join(["/a", str(MODULE_DIR)]), "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(MODULE_DIR), "/a"]
    assert env["HOME"] == "/h" and env["PYTHONIOENCODING"] == "utf-8" and env["PYTHONUNBUFFERED"] == "1"
    assert (MODULE_DIR / "UNet3DSegmentLib" / "__main__.py").is_file()


def test_error_for_exit_without_any_message() -> None:
    error = error_for_exit(3)
    assert type(error) is BadInputError
    assert str(error) == "engine failed with exit code 3 and no message; run it in a terminal to see why"
    assert error_for_exit(0) is None
    assert type(error_for_exit(0, cancelled=True)) is CancelledError
    assert type(error_for_exit(5)) is CancelledError


def test_every_flag_the_panel_can_send_is_accepted_by_the_engine_command_line() -> None:
    """The command builder and the engine's argparse must agree (a mismatch fails only at run time)."""
    from UNet3DSegmentLib.cli.main import build_parser

    options = SegmentOptions(overlap=0.25, batch_size=4, blend="constant", tta=True, device="cpu",
                             precision="bf16", largest_component=True, backend="jax", gpu_index=2,
                             gpu_memory_limit="1.5G", max_memory="3G", accumulation="float16", threads=3)
    command = segment_command("/py", ["/in/t1.nrrd"], "/o.nrrd", model="/m/model.keras", options=options)
    args = build_parser().parse_args(command[3:])
    assert (args.backend, args.gpu_index, args.gpu_memory_limit, args.max_memory, args.accumulation) == (
        "jax", 2, int(1.5 * 2**30), 3 * 2**30, "float16")
    from UNet3DSegmentLib.cli.arguments import options_from_args

    assert options_from_args(args, SegmentOptions) == options  # every option survives the trip to the child
    assert (args.inputs, args.output, args.model) == (["/in/t1.nrrd"], "/o.nrrd", "/m/model.keras")
    assert (args.overlap, args.batch_size, args.blend, args.tta) == (0.25, 4, "constant", True)
    assert (args.device, args.precision, args.largest_component, args.progress) == ("cpu", "bf16", True, "json")


# --- behind Slicer's PythonSlicer launcher (issue 11, defect 2) ------------------------------------
# Testing/fakes/PythonSlicer stands in for the CTK launcher (see the facts in its docstring): it runs
# python-real as its child in the same process group with inherited stdout/stderr, passes a normal
# exit code on, turns a child killed by a signal into "error: [<python-real>] exit abnormally -
# Report the problem." + exit 1, and dies at SIGTERM at once. Testing/fakes/fake_engine.py is the
# engine (no TensorFlow).

FAKES = Path(__file__).resolve().parent / "fakes"
FAKE_ENGINE = FAKES / "fake_engine.py"
REMEDY = "try a smaller batch size, the CPU device, or a smaller overlap or volume"
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and process groups")


class Launcher:
    """How to run the fake engine: through the stand-in PythonSlicer, or directly (``python_real``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.python_real = tmp_path / "bin" / "python-real"  # the name the real launcher reports
        self.python_real.parent.mkdir()
        self.python_real.symlink_to(sys.executable)
        script = FAKES / "PythonSlicer"
        self.prefix = [str(script)] if os.access(script, os.X_OK) else ["/bin/sh", str(script)]
        self.env = dict(os.environ, UNET3D_FAKE_PYTHON_REAL=str(self.python_real),
                        UNET3D_FAKE_LAUNCHER_PYTHON=sys.executable)

    def start(self, *arguments: object, launcher: bool = True) -> EngineProcess:
        prefix = self.prefix if launcher else [str(self.python_real)]
        return EngineProcess.start(prefix + [str(FAKE_ENGINE)] + [str(a) for a in arguments], env=self.env)


@pytest.fixture()
def slicer(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path)


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.01)
    return path.read_text()


@posix_only
def test_launcher_passes_exit_codes_and_output_on(slicer: Launcher, tmp_path: Path) -> None:
    process = slicer.start("exit", 3, "bad-input", "input volume is empty")
    run_to_end(process)
    assert process.returncode == 3
    assert type(process.error()) is BadInputError and str(process.error()) == "input volume is empty"
    process = slicer.start("ok", tmp_path / "seg.nrrd")
    assert [e["stage"] for e in run_to_end(process)] == ["load", "inference", "done"]
    assert process.returncode == 0 and process.error() is None and process.output == tmp_path / "seg.nrrd"


@posix_only
@pytest.mark.parametrize("launcher", [True, False], ids=["behind-PythonSlicer", "direct"])
def test_engine_killed_by_the_oom_killer_is_reported_as_out_of_memory(slicer: Launcher, launcher: bool) -> None:
    process = slicer.start("oom", launcher=launcher)
    events = run_to_end(process, timeout=10.0)
    assert [e["stage"] for e in events] == ["load", "inference"]
    allocator_warning = ("W external/local_tsl/tsl/framework/cpu_allocator_impl.cc:83] Allocation of 1073741824 "
                         "exceeds 10% of free system memory")
    if launcher:
        assert process.returncode == 1  # all the launcher says about SIGKILL, besides its line:
        assert process.stderr_tail[-1] == f"error: [{slicer.python_real}] exit abnormally - Report the problem."
        detail = "python-real exited abnormally (reported by the Python launcher)"
    else:
        assert process.returncode == -9
        detail = "the engine process was ended by SIGKILL"
    error = process.error()
    assert type(error) is UNet3DSegmentError and not process.cancelled
    assert str(error) == (f"the engine was killed (most likely out of memory): {detail}; "
                          f"its last message: {allocator_warning}; {REMEDY}")
    assert "\n" not in str(error)


@posix_only
@pytest.mark.parametrize("how", ["request_cancel+poll", "cancel"])
def test_cancel_behind_the_launcher_lets_python_real_clean_up_and_exit_5(slicer: Launcher, tmp_path: Path,
                                                                         how: str) -> None:
    """The launcher dies at SIGTERM at once; python-real (same group) still gets its grace period."""
    work = tmp_path / "work"
    work.mkdir()
    cleanup_seconds, grace = 1.5, 6.0  # wide margins: the checks below must hold on a loaded 2-core machine
    process = slicer.start("graceful", work, cleanup_seconds)
    python_real_pid = int(wait_for_file(work / "ready"))
    assert (work / "engine.tmp").exists() and python_real_pid != process.pid
    start = time.monotonic()
    if how == "cancel":
        process.cancel(grace_seconds=grace)
        events = process.poll()
    else:
        process.request_cancel(grace_seconds=grace)
        assert time.monotonic() - start < 1.0  # returns at once, well before the engine's clean-up ends
        while process.returncode is None:  # the launcher goes at once...
            assert time.monotonic() - start < cleanup_seconds, "the launcher outlived SIGTERM"
            time.sleep(0.005)
        assert process.returncode == -15
        # ...while python-real cleans up: the job is not finished, and nothing here blocks.
        before = time.monotonic()
        assert not process.finished
        events = process.poll()
        assert process.wait(timeout=0.05) is None
        assert time.monotonic() - before < 1.0
        assert not gone(python_real_pid) and (work / "engine.tmp").exists()
        events += run_to_end(process)
    elapsed = time.monotonic() - start
    assert (work / "cleaned").read_text() == "cleaned up after SIGTERM"
    assert not (work / "engine.tmp").exists()
    assert cleanup_seconds <= elapsed < grace
    assert gone(python_real_pid)
    assert process.finished and process.cancelled and process.returncode == -15
    assert type(process.error()) is CancelledError
    assert process.last_error is not None and process.last_error["exit_code"] == 5
    assert process.last_error["kind"] == "cancelled"
    if how != "cancel":
        assert events[-1]["stage"] == "error" and events[-1]["exit_code"] == 5


@posix_only
@pytest.mark.parametrize("launcher", [True, False], ids=["behind-PythonSlicer", "direct"])
def test_engine_that_ignores_sigterm_is_killed_after_the_grace_period(slicer: Launcher, tmp_path: Path,
                                                                      launcher: bool) -> None:
    work = tmp_path / "work"
    work.mkdir()
    process = slicer.start("stubborn", work, launcher=launcher)
    python_real_pid = int(wait_for_file(work / "ready"))
    grace = 0.5
    start = time.monotonic()
    process.request_cancel(grace_seconds=grace)
    run_to_end(process, timeout=5.0)
    elapsed = time.monotonic() - start
    assert grace <= elapsed < grace + 1.5
    assert gone(python_real_pid)
    assert process.returncode == (-15 if launcher else -9)  # the launcher itself dies at SIGTERM
    assert (work / "engine.tmp").exists() and not (work / "cleaned").exists()  # no clean-up: SIGKILLed
    assert process.cancelled and type(process.error()) is CancelledError


def test_launcher_report_of_a_killed_child_reads_as_out_of_memory() -> None:
    line = "error: [/opt/Slicer/bin/../lib/Python/bin/python-real] exit abnormally - Report the problem."
    error = error_for_exit(1, None, ["some TensorFlow chatter", line])
    assert type(error) is UNet3DSegmentError
    assert str(error) == ("the engine was killed (most likely out of memory): python-real exited abnormally "
                          f"(reported by the Python launcher); its last message: some TensorFlow chatter; {REMEDY}")
    assert str(error_for_exit(1, None, [line])) == (
        f"the engine was killed (most likely out of memory): python-real exited abnormally (reported by the "
        f"Python launcher); {REMEDY}")
    assert type(error_for_exit(1, None, [line], cancelled=True)) is CancelledError
    assert type(error_for_exit(3, None, ["bad volume", line])) is BadInputError  # only exit 1 is the launcher's
    plain = error_for_exit(1, {"message": "ValueError: boom"}, ["Traceback ..."])
    assert type(plain) is UNet3DSegmentError and str(plain) == "ValueError: boom" and plain.exit_code == 1
    killed = error_for_exit(-9, {"message": "patch 3/40."})
    assert str(killed) == ("the engine was killed (most likely out of memory): the engine process was ended by "
                           f"SIGKILL; its last message: patch 3/40; {REMEDY}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_group_left_with_zombies_only_counts_as_gone() -> None:
    """An orphaned python-real that nobody reaps must not hold the SIGKILL back until the grace ends."""
    from UNet3DSegmentLib.client.engine_process import _group_alive  # (local: the file also runs on older code)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert _group_alive(sleeper.pid) is True
    finally:
        sleeper.kill()
    deadline = time.monotonic() + 5.0
    while psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(sleeper.pid, 0)  # the kernel still counts the unreaped zombie as a member...
    assert _group_alive(sleeper.pid) is False  # ...we do not
    assert sleeper.wait() == -9
    assert _group_alive(sleeper.pid) is False
