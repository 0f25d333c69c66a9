"""The warm engine: ``unet3d-segment serve`` kept alive by ``client.warm_engine.WarmEngine``, and the MRML
logic running through it (``keepEngineWarm=True``).

Real children with the tiny model. The tests of one ``WarmEngine`` run in order on one module-scoped
engine, so that each start of a child (the framework's import and the model load, the cost the warm
engine saves) is paid only where the test is about a new child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_CARD, oblique_anisotropic_image, save_tiny_model
from UNet3DSegmentLib.base.errors import CancelledError, UNet3DSegmentError
from UNet3DSegmentLib.base.options import SegmentOptions
from UNet3DSegmentLib.client.engine_process import engine_environment
from UNet3DSegmentLib.client.warm_engine import WarmEngine, split_runtime_arguments

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX here")

THREADS_1 = SegmentOptions(threads=1)
TIMEOUT = 120


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("warm_inputs")
    small = folder / "oblique.nrrd"
    sitk.WriteImage(oblique_anisotropic_image(), str(small))
    big = folder / "big.nrrd"  # with overlap 0.9, batch 1 and TTA: thousands of patches, time to cancel
    sitk.WriteImage(oblique_anisotropic_image(shape_zyx=(40, 56, 56), seed=3), str(big))
    return {"small": small, "big": big}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("other_model"), seed=1, name="other")


@pytest.fixture(scope="module")
def engine():
    warm = WarmEngine(idle_timeout=120)
    yield warm
    pid = warm.pid
    warm.stop()
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def cold_labels(tmp_path_factory: pytest.TempPathFactory, inputs, tiny_model_path) -> np.ndarray:
    """The labelmap of a cold ``segment`` (the command, run here: the model is loaded for it alone)."""
    from UNet3DSegmentLib.cli.main import main

    output = tmp_path_factory.mktemp("cold") / "labels.nrrd"
    assert main(["segment", str(inputs["small"]), "-o", str(output), "--model", str(tiny_model_path),
                 "--progress", "none"]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output)))


def finish(request, timeout: float = TIMEOUT) -> list[dict]:
    """Poll a request until it is finished, as SegmentationJob does; all its events."""
    events, deadline = [], time.monotonic() + timeout
    while not request.finished:
        events += request.poll()
        assert time.monotonic() < deadline, "request still running"
        time.sleep(0.02)
    return events + request.poll()


def wait_for_inference(request, timeout: float = TIMEOUT) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout
    while not any(e["stage"] == "inference" for e in events):
        assert not request.finished, f"finished before its first patch: {request.error()}"
        assert time.monotonic() < deadline
        events += request.poll()
        time.sleep(0.02)
    return events


def gone(pid: int, timeout: float = 15) -> bool:
    """Whether process ``pid`` has ended (and been reaped) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------------------------------------
# WarmEngine, in order on one engine


def test_second_run_is_warm_and_equals_a_cold_segment(engine, inputs, tiny_model_path, cold_labels, tmp_path):
    first = engine.run(sys.executable, [inputs["small"]], tmp_path / "a.nrrd", tiny_model_path, THREADS_1)
    events = finish(first)
    assert first.error() is None and first.returncode == 0
    assert first.output == tmp_path / "a.nrrd"
    pid = first.pid
    assert engine.pid == pid and not engine.busy

    second = engine.run(sys.executable, [inputs["small"]], tmp_path / "b.nrrd", tiny_model_path, THREADS_1)
    second_events = finish(second)
    assert second.error() is None and second.pid == pid  # the same child: warm
    np.testing.assert_array_equal(labels_of(tmp_path / "a.nrrd"), cold_labels)
    np.testing.assert_array_equal(labels_of(tmp_path / "b.nrrd"), cold_labels)
    assert len(np.unique(cold_labels)) >= 2

    for run, run_events in [(first, events), (second, second_events)]:
        assert {e["id"] for e in run_events} == {run.request_id}
        assert run_events[0]["stage"] == "load" and run_events[-1]["stage"] == "done"
        patches = [e for e in run_events if e["stage"] == "inference"]
        assert patches[-1]["done"] == patches[-1]["total"] == 12
    assert any(e["message"] == "model tiny.keras already loaded" for e in second_events)
    assert first.request_id != second.request_id


def test_changed_runtime_option_or_model_starts_another_child(engine, inputs, tiny_model_path, other_model,
                                                               tmp_path):
    before = engine.pid
    assert before is not None
    run = engine.run(sys.executable, [inputs["small"]], tmp_path / "c.nrrd", tiny_model_path,
                     SegmentOptions(threads=2))
    finish(run)
    assert run.error() is None
    assert run.pid != before and engine.pid == run.pid
    assert gone(before)  # the old child was stopped

    threads_2 = run.pid
    run = engine.run(sys.executable, [inputs["small"]], tmp_path / "d.nrrd", other_model, SegmentOptions(threads=2))
    finish(run)
    assert run.error() is None and run.pid not in (before, threads_2)
    assert not np.array_equal(labels_of(tmp_path / "d.nrrd"), labels_of(tmp_path / "c.nrrd"))

    # Not the runtime: overlap travels with the request, the child stays.
    same = run.pid
    run = engine.run(sys.executable, [inputs["small"]], tmp_path / "e.nrrd", other_model,
                     SegmentOptions(threads=2, overlap=0.25))
    finish(run)
    assert run.error() is None and run.pid == same


def test_cancel_mid_run_leaves_no_output_and_the_next_run_works(engine, inputs, other_model, tmp_path):
    options = SegmentOptions(threads=2, overlap=0.9, batch_size=1, tta=True)
    out = tmp_path / "out"
    out.mkdir()
    run = engine.run(sys.executable, [inputs["big"]], out / "big.nrrd", other_model, options)
    pid = run.pid
    wait_for_inference(run)
    assert engine.busy
    with pytest.raises(UNet3DSegmentError, match="already running on the warm engine"):
        engine.run(sys.executable, [inputs["small"]], out / "x.nrrd", other_model, options)
    run.request_cancel()
    events = finish(run, timeout=30)
    assert run.returncode == 5  # the child stopped on SIGTERM, cleaned up, exited "cancelled"
    assert isinstance(run.error(), CancelledError)
    assert events[-1]["stage"] == "error" and events[-1]["kind"] == "cancelled"
    assert sorted(p.name for p in out.iterdir()) == []
    assert gone(pid, timeout=0)  # finished means the child is gone

    again = engine.run(sys.executable, [inputs["small"]], out / "small.nrrd", other_model, SegmentOptions(threads=2))
    finish(again)
    assert again.error() is None and again.pid != pid
    assert sorted(p.name for p in out.iterdir()) == ["small.nrrd"]


def test_killed_child_fails_the_request_clearly_and_the_next_run_restarts(engine, inputs, other_model, tmp_path):
    options = SegmentOptions(threads=2, overlap=0.9, batch_size=1, tta=True)
    run = engine.run(sys.executable, [inputs["big"]], tmp_path / "big.nrrd", other_model, options)
    wait_for_inference(run)
    pid = run.pid
    os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    finish(run, timeout=30)
    error = run.error()
    assert type(error) is UNet3DSegmentError
    assert "killed" in str(error) and "SIGKILL" in str(error)
    assert run.returncode == -signal.SIGKILL
    assert not (tmp_path / "big.nrrd").exists()

    again = engine.run(sys.executable, [inputs["small"]], tmp_path / "small.nrrd", other_model,
                       SegmentOptions(threads=2))
    finish(again)
    assert again.error() is None and again.pid != pid and engine.pid == again.pid


def test_runtime_flags_are_split_from_the_rest() -> None:
    """What the child is started with (and keyed by): runtime options, and how the model is loaded."""
    argv = ["--overlap", "0.25", "--device", "cpu", "--threads=2", "--tta", "--gpu-memory-limit", "6G",
            "--trust-model", "--x"]
    assert split_runtime_arguments(argv) == (
        ["--device", "cpu", "--threads=2", "--gpu-memory-limit", "6G", "--trust-model"],
        ["--overlap", "0.25", "--tta", "--x"],
    )


# ---------------------------------------------------------------------------------------------
# The serve protocol itself: bad requests, a request for another runtime, idle timeout


def test_serve_answers_bad_requests_and_goes_on_then_stops_when_idle(inputs, tiny_model_path, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "UNet3DSegmentLib", "serve", "--model", str(tiny_model_path), "--threads", "1",
         "--idle-timeout", "1.5", "--progress", "json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env=engine_environment(),
    )
    try:
        ready = json.loads(process.stdout.readline())
        assert ready["stage"] == "ready" and ready["pid"] == process.pid and ready["device"] == "cpu"

        def ask(line: str) -> list[dict]:
            process.stdin.write(line + "\n")
            process.stdin.flush()
            events = []
            while not events or events[-1]["stage"] not in ("done", "error"):
                events.append(json.loads(process.stdout.readline()))
            return events

        bad = ask("this is not json")
        assert len(bad) == 1 and bad[0]["stage"] == "error" and bad[0]["kind"] == "bad-input"
        assert bad[0]["exit_code"] == 3 and bad[0]["message"].startswith("request is not JSON")
        bad = ask(json.dumps({"id": "b", "argv": [str(inputs["small"]), "--overlap", "2"]}))
        assert bad[-1]["id"] == "b" and bad[-1]["kind"] == "bad-input" and bad[-1]["exit_code"] == 3
        assert "overlap must be >= 0 and < 1, got 2" in bad[-1]["message"]  # the check segment makes
        other = ask(json.dumps({"id": "c", "argv": [str(inputs["small"]), "-o", str(tmp_path / "c.nrrd"),
                                                    "--model", str(tiny_model_path), "--device", "gpu"]}))
        assert other[-1]["restart"] is True and other[-1]["kind"] == "bad-input"
        assert "device='gpu' (server: 'auto')" in other[-1]["message"]
        missing = ask(json.dumps({"id": "d", "argv": [str(tmp_path / "nope.nrrd"), "-o", str(tmp_path / "d.nrrd"),
                                                      "--model", str(tiny_model_path), "--threads", "1"]}))
        assert missing[-1]["kind"] == "bad-input" and missing[-1]["exit_code"] == 3  # as segment says it
        assert "nope.nrrd does not exist" in missing[-1]["message"]
        good = ask(json.dumps({"id": "e", "argv": [str(inputs["small"]), "-o", str(tmp_path / "e.nrrd"),
                                                   "--model", str(tiny_model_path), "--threads", "1"]}))
        assert good[-1]["stage"] == "done" and good[-1]["id"] == "e" and (tmp_path / "e.nrrd").is_file()

        started = time.monotonic()
        stopped = json.loads(process.stdout.readline())
        assert stopped["stage"] == "stopped" and stopped["reason"] == "idle-timeout"
        assert process.wait(30) == 0
        assert 1.0 < time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# The MRML logic on slicer-core


def test_logic_with_a_warm_engine_gives_the_same_segments(tmp_path, inputs, tiny_model_path):
    from test_mrml_logic import HeadlessSlicer, exported_labels

    from UNet3DSegmentLib.mrml.logic import UNet3DSegmentLogic

    app = HeadlessSlicer()
    volume = app.load_volume(inputs["small"])
    cold_logic = UNet3DSegmentLogic(scene=app.scene, temporaryRoot=tmp_path / "cold")
    assert cold_logic.keepEngineWarm is False
    cold = cold_logic.segment(volume, model=tiny_model_path, threads=1)
    assert cold_logic._warmEngine is None

    logic = UNet3DSegmentLogic(scene=app.scene, temporaryRoot=tmp_path / "warm", keepEngineWarm=True)
    pids, nodes = [], []
    for _ in range(2):
        events = []
        nodes.append(logic.segment(volume, model=tiny_model_path, threads=1, progress=events.append))
        pids.append(logic._warmEngine.pid)
        assert events[-1]["stage"] == "done"
    assert pids[0] == pids[1] is not None

    expected, matrix = exported_labels(cold, volume)
    for node in nodes:
        labels, node_matrix = exported_labels(node, volume)
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_allclose(node_matrix, matrix, atol=1e-9)
        names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
        assert names == [c["name"] for c in TINY_CARD["classes"][1:]]
    assert len(np.unique(expected)) >= 2
    assert sorted(p.name for p in (tmp_path / "warm").iterdir()) == []

    logic.shutdownEngine()  # what the Slicer module calls on cleanup and scene close; returns at once
    assert logic._warmEngine is None
    assert gone(pids[0])
    logic.shutdownEngine()  # twice is fine
