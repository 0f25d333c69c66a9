"""Security and bad input (issue 12): SavedModel safety, the web server's origin/token guard, the web model
choice list, upload size caps, the class count of models without a card.

The malicious SavedModel is built here: a ``tf.Module`` whose serving function writes a file and reads
/etc/hostname (``tf.io.write_file`` / ``tf.io.read_file``), some of it in a nested ``tf.function``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CARD, save_tiny_model

from UNet3DSegmentLib.base.errors import EXIT_BAD_MODEL, BadModelError
from UNet3DSegmentLib.base.options import SegmentOptions, WebOptions
from UNet3DSegmentLib.engine.loading import load_model


# --- item 1: SavedModels hold only pure tensor operations -------------------------------------------
def _evil_saved_model(folder: Path, witness: Path) -> Path:
    """A valid 2-class segmentation SavedModel whose serving function writes ``witness`` and reads /etc/hostname."""
    import tensorflow as tf

    @tf.function
    def leak():  # nested: the file operations sit in a function of the library, not the signature's own
        secret = tf.io.read_file("/etc/hostname")
        tf.io.write_file(str(witness), secret)
        return tf.strings.length(secret)

    class Evil(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 16, 1], tf.float32)])
        def serve(self, x):
            scale = tf.cast(leak() * 0, tf.float32)
            return {"output_0": tf.nn.softmax(tf.concat([x, -x], axis=-1) + scale)}

    module = Evil()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("evil")
    witness = folder / "pwned.txt"
    return _evil_saved_model(folder / "evil", witness), witness


@pytest.fixture(scope="module")
def safe_saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from UNet3DSegmentLib.engine.network import build_unet3d

    keras.utils.set_random_seed(0)
    model = build_unet3d(patch_size=(16, 16, 16), in_channels=1, num_classes=4, base_filters=2)
    folder = tmp_path_factory.mktemp("safe") / "exported"
    model.export(folder, verbose=False)
    return folder


def _volume(path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)),
                    str(path))
    return path


def test_saved_model_with_file_operations_is_refused_before_anything_runs(evil_model) -> None:
    folder, witness = evil_model
    with pytest.raises(BadModelError, match=r"SavedModel evil uses the operation '(ReadFile|WriteFile)' \(in function "
                                            r".*leak.*\).*--trust-model"):
        load_model(folder)
    assert not witness.exists()


def test_cli_exits_4_on_a_malicious_saved_model_and_trust_model_is_the_only_way_past(
        evil_model, tmp_path: Path, capsys) -> None:
    from UNet3DSegmentLib.cli.main import main
    from UNet3DSegmentLib.engine.loading import trust_models

    folder, witness = evil_model
    volume = _volume(tmp_path / "t1.nrrd")
    try:
        code = main(["segment", str(volume), "-o", str(tmp_path / "out.nrrd"), "--model", str(folder),
                     "--progress", "none", "--device", "cpu"])
        assert code == EXIT_BAD_MODEL
        assert "uses the operation" in capsys.readouterr().err
        assert not witness.exists() and not (tmp_path / "out.nrrd").exists()
        # The documented opt-in: the same model runs (and does what it holds) only with --trust-model.
        code = main(["segment", str(volume), "-o", str(tmp_path / "out.nrrd"), "--model", str(folder),
                     "--progress", "none", "--device", "cpu", "--trust-model"])
        assert code == 0 and witness.exists()
    finally:
        trust_models(False)
        witness.unlink(missing_ok=True)


def test_keras_exported_saved_model_passes_the_check_and_loads(safe_saved_model: Path) -> None:
    from UNet3DSegmentLib.engine.savedmodel_safety import ALLOWED_OPS, check_saved_model, saved_model_ops

    check_saved_model(safe_saved_model)
    loaded = load_model(safe_saved_model)
    assert loaded.num_classes == 4
    ops = saved_model_ops(safe_saved_model)
    serving = set().union(*(o for name, o in ops.items() if "call" in name))
    assert serving <= ALLOWED_OPS and "Conv3D" in serving
    assert "SaveV2" in set().union(*ops.values())  # the checkpoint functions exist, and are tolerated there only


def _edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of the SavedModel ``source`` whose saved_model.pb went through ``edit(saved_model_proto)``."""
    import shutil

    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(source, target)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((target / "saved_model.pb").read_bytes())
    edit(proto)
    (target / "saved_model.pb").write_bytes(proto.SerializeToString())
    return target


def _function(proto, part: str):
    return next(f for f in proto.meta_graphs[0].graph_def.library.function if part in f.signature.name)


@pytest.mark.parametrize("edit, message", [
    # checkpoint functions may save and restore, but nothing else
    (lambda p: _function(p, "traced_save").node_def.add(name="w", op="WriteFile"), r"'WriteFile' \(in function "
                                                                                   r"__inference__traced_save"),
    # a checkpoint function called from the serving code is held to the strict list
    (lambda p: _function(p, "__inference___call__").node_def.add(name="c", op=_function(p, "traced_save").signature.name),
     r"'(SaveV2|MergeV2Checkpoints|ShardedFilename|StringJoin|StaticRegexFullMatch|DisableCopyOnRead)' \(in function "
     r"__inference__traced_save"),
    # a checkpoint function named by an object-graph node (the loader would run it) is held to the strict list
    (lambda p: p.meta_graphs[0].object_graph_def.nodes.add().bare_concrete_function.__setattr__(
        "concrete_function_name", _function(p, "traced_save").signature.name),
     r"'(SaveV2|MergeV2Checkpoints|ShardedFilename|StringJoin|StaticRegexFullMatch|DisableCopyOnRead)' \(in function "
     r"__inference__traced_save"),
    # a call to a function the SavedModel does not hold
    (lambda p: _function(p, "signature_wrapper").node_def[-1].attr["f"].func.__setattr__("name", "elsewhere"),
     r"calls function 'elsewhere', which it does not contain"),
    # TF1 SavedModels run their initialisers on load
    (lambda p: p.meta_graphs[0].ClearField("object_graph_def"), "TensorFlow 1 SavedModel"),
    # a side-effecting op at graph level
    (lambda p: p.meta_graphs[0].graph_def.node.add(name="p", op="PrintV2"), r"'PrintV2' \(graph node p\)"),
])
def test_edited_saved_models_are_refused(safe_saved_model: Path, tmp_path: Path, edit, message) -> None:
    from UNet3DSegmentLib.engine.savedmodel_safety import check_saved_model

    def apply(proto) -> None:
        for function in proto.meta_graphs[0].graph_def.library.function:  # find a node with an "f" attribute
            if "signature_wrapper" in function.signature.name:
                call = next(n for n in function.node_def if "f" in n.attr)
                function.node_def.remove(call)
                function.node_def.append(call)  # the call last, so node_def[-1] is it
        edit(proto)

    with pytest.raises(BadModelError, match=message):
        check_saved_model(_edited_copy(safe_saved_model, tmp_path / "edited", apply))


def test_trust_model_option_is_declared_for_the_command_line_and_the_engine_child_only() -> None:
    import ast

    import UNet3DSegmentLib
    from UNet3DSegmentLib.cli.main import build_parser

    app_source = (Path(UNet3DSegmentLib.__file__).parent / "web" / "app.py").read_text(encoding="utf-8")
    PAGE_OPTIONS = next(ast.literal_eval(node.value) for node in ast.parse(app_source).body
                        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PAGE_OPTIONS")

    declared = SegmentOptions.spec("trust_model")
    assert declared.default is False and "trust" in declared.help and declared.cli_flag == "--trust-model"
    assert SegmentOptions(trust_model=True).to_argv() == ["--trust-model"]
    assert build_parser().parse_args(["segment", "x.nrrd", "-o", "y.nrrd", "--trust-model"]).trust_model is True
    assert "trust_model" not in PAGE_OPTIONS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["web", "--trust-model"])


# --- item 13: a model without a card gets its own class count (no "Class 3" that is always empty) ---------
def _three_class_two_channel_model(folder: Path):
    import keras

    from UNet3DSegmentLib.engine.network import build_unet3d

    keras.utils.set_random_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    return build_unet3d(patch_size=(16, 16, 16), in_channels=2, num_classes=3, base_filters=2)


def test_model_without_card_lists_its_own_classes_read_cheaply(tmp_path: Path) -> None:
    from UNet3DSegmentLib.engine.model_summary import ModelSummary, read_model_summary
    from UNet3DSegmentLib.mrml.logic import UNet3DSegmentLogic

    model = _three_class_two_channel_model(tmp_path)
    model.save(tmp_path / "three.keras")
    model.save(tmp_path / "three.h5")
    model.export(tmp_path / "three_saved", verbose=False)
    model.save_weights(tmp_path / "weights_only.weights.h5")
    for name in ("three.keras", "three.h5", "three_saved"):
        assert read_model_summary(tmp_path / name) == ModelSummary(in_channels=2, num_classes=3), name
        card, from_file = UNet3DSegmentLogic.modelCard(tmp_path / name)
        assert not from_file
        assert [c.name for c in card.classes] == ["Background", "Class 1", "Class 2"], name
        assert card.in_channels == 2, name
    # Weights only: the engine rebuilds the seed network from the default card, so the default stands.
    weights = tmp_path / "weights_only.h5"
    (tmp_path / "weights_only.weights.h5").rename(weights)
    assert read_model_summary(weights) == ModelSummary()
    assert UNet3DSegmentLogic.modelCard(weights)[0].num_classes == 4
    # Anything unreadable: unknown, and the seed defaults.
    (tmp_path / "garbage.keras").write_bytes(b"PK\x03\x04 no zip")
    (tmp_path / "garbage_saved").mkdir()
    (tmp_path / "garbage_saved" / "saved_model.pb").write_bytes(b"\xff" * 64)
    for name in ("garbage.keras", "garbage_saved"):
        assert read_model_summary(tmp_path / name) == ModelSummary()
        assert UNet3DSegmentLogic.modelCard(tmp_path / name)[0].num_classes == 4


def test_model_summary_does_not_load_a_framework(tmp_path: Path) -> None:
    import subprocess

    model = _three_class_two_channel_model(tmp_path)
    model.save(tmp_path / "three.keras")
    model.export(tmp_path / "three_saved", verbose=False)
    code = ("import sys; from UNet3DSegmentLib.engine.model_summary import read_model_summary as r; "
            f"print(r({str(tmp_path / 'three.keras')!r}).num_classes, r({str(tmp_path / 'three_saved')!r}).num_classes, "
            "any(m in sys.modules for m in ('tensorflow', 'keras', 'torch', 'jax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["3", "3", "False"]


# --- item 3: the web page chooses among models fixed at launch -----------------------------------------
def test_web_model_choices_are_fixed_at_launch_and_reveal_nothing_else(tmp_path: Path) -> None:
    from UNet3DSegmentLib.base.errors import BadInputError
    from UNet3DSegmentLib.web.models import ModelChoices, models_in

    folder = tmp_path / "models"
    model = save_tiny_model(folder, name="a")
    (folder / "b.h5").write_bytes(b"x")
    (folder / "notes.txt").write_text("no model")
    (folder / "exported").mkdir()
    (folder / "exported" / "saved_model.pb").write_bytes(b"")
    (folder / "empty_folder").mkdir()
    assert [p.name for p in models_in(folder)] == ["a.keras", "b.h5", "exported"]
    choices = ModelChoices(model, folder)
    assert choices.default == str(model.resolve())
    assert choices.items[0]["title"] == "a.keras (--model)" and "Bundled demo model" in choices.items[1]["title"]
    assert len(choices.values) == 4  # --model (also in the folder: listed once), bundled, b.h5, exported
    assert choices.check(str(folder.resolve() / "b.h5")) == str(folder.resolve() / "b.h5")
    for probe in ("/etc/hostname", "/etc/passwd", str(folder / "notes.txt"), str(folder / ".." / "models" / "a.keras"),
                  "", None, ["/etc/hostname"]):
        with pytest.raises(BadInputError) as refused:
            choices.check(probe)
        assert "choose one of the listed models" in str(refused.value) and "etc" not in str(refused.value)
    with pytest.raises(BadModelError, match="is not a folder"):
        models_in(tmp_path / "missing")


def test_web_command_has_models_dir_and_no_trust_option() -> None:
    from UNet3DSegmentLib.cli.main import build_parser

    args = build_parser().parse_args(["web", "--models-dir", "/models"])
    assert args.models_dir == "/models" and not hasattr(args, "trust_model")
    assert WebOptions.spec("models_dir").default is None


# --- item 2: only the server's own origin, with the launch's token ---------------------------------------
def test_access_guard_rules() -> None:
    from multidict import CIMultiDict

    from UNet3DSegmentLib.web.guard import AccessGuard

    guard = AccessGuard("t" * 43)
    own = {"Host": "127.0.0.1:8080"}

    def check(headers, query=None, cookies=None, port=8080):
        return guard.check(CIMultiDict(headers), query or {}, cookies or {}, port)[0]

    assert check(own, {"secret": "t" * 43})
    assert check({"Host": "localhost:8080", "Origin": "http://localhost:8080"}, cookies={"unet3d_web_8080": "t" * 43})
    assert not check(own)  # no token
    assert not check(own, {"secret": "wslink-secret"})  # trame's public default
    assert not check(own, cookies={"unet3d_web_9090": "t" * 43})  # another server's cookie
    assert not check({**own, "Origin": "http://evil.example"}, {"secret": "t" * 43})
    assert not check({**own, "Origin": "http://127.0.0.1:9999"}, {"secret": "t" * 43})
    assert not check({"Host": "evil.example:8080"}, {"secret": "t" * 43})  # DNS rebinding
    assert not check({"Host": "127.0.0.1:8081"}, {"secret": "t" * 43})
    assert not check({**own, "Upgrade": "websocket"}, {"secret": "t" * 43})  # a WebSocket must say its origin
    assert guard.url(8080) == "http://127.0.0.1:8080/?secret=" + "t" * 43
    assert AccessGuard("x", "0.0.0.0").host_allowed("gpu-server:8080", 8080)


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("trame_slicer")
    from test_web_app import running_server

    folder = tmp_path_factory.mktemp("web_security")
    model = save_tiny_model(folder / "models")
    with running_server(model, folder / "server.log", max_upload_mb=1, models_dir=folder / "models") as url:
        yield url, folder / "server.log"


def _ws_url(url: str) -> str:
    return url.split("?")[0].replace("http://", "ws://") + "ws"


async def _hello(ws, secret: str) -> dict:
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    message = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": secret}], "kwargs": {}}
    for chunk in generate_chunks(msgpack.packb(message), 4 * 2 ** 20):
        await ws.send_bytes(chunk)
    unchunker = UnChunker()
    unchunker.set_max_message_size(2 ** 30)
    while True:
        reply = unchunker.process_chunk((await ws.receive(timeout=30)).data)
        if reply is not None and reply.get("id") == "system:c0:0":
            return reply


def test_web_server_refuses_foreign_origins_and_requests_without_the_token(web_server) -> None:
    import asyncio

    import aiohttp

    url, _ = web_server
    base, token = url.split("?")[0], url.rsplit("=", 1)[1]
    origin = base.rstrip("/")

    async def probe() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            async def status(target: str, **headers) -> int:
                async with session.get(target, headers=headers, allow_redirects=False) as response:
                    return response.status

            assert await status(base + "index.html") == 403
            assert await status(base + "index.html?secret=wslink-secret") == 403
            assert await status(base + f"index.html?secret={token}") == 200
            assert await status(base + f"index.html?secret={token}", Origin="http://evil.example") == 403
            assert await status(base + f"index.html?secret={token}", Host="evil.example:" + base.rsplit(":", 1)[1][:-1]) == 403
            cookie = {"Cookie": f"unet3d_web_{base.rsplit(':', 1)[1][:-1]}={token}"}
            assert await status(base + "index.html", **cookie) == 200
            for headers in ({"Origin": "http://evil.example", **cookie}, {"Origin": origin}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(_ws_url(url), headers=headers)
                assert refused.value.status == 403
            async with session.ws_connect(_ws_url(url), headers={"Origin": origin, **cookie}) as ws:
                assert "clientID" in (await _hello(ws, token))["result"]

    asyncio.run(probe())


# --- item 10: an upload over --max-upload-mb is refused at its first chunk -------------------------------
def test_web_socket_refuses_an_oversized_message_at_its_first_chunk(web_server) -> None:
    import asyncio

    import aiohttp

    url, log = web_server
    base, token = url.split("?")[0], url.rsplit("=", 1)[1]
    port = base.rsplit(":", 1)[1][:-1]
    announced = 64 * 2 ** 20  # 64 MB announced, 1 MB limit: nothing of it may be allocated or awaited

    async def probe() -> None:
        headers = {"Origin": base.rstrip("/"), "Cookie": f"unet3d_web_{port}={token}"}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            async with session.ws_connect(_ws_url(url), headers=headers) as ws:
                await _hello(ws, token)
                header = (12345).to_bytes(4, "little") + (0).to_bytes(4, "little") + announced.to_bytes(4, "little")
                await ws.send_bytes(header + b"\x00" * 1024)
                await ws.send_bytes((12345).to_bytes(4, "little") + (1024).to_bytes(4, "little")
                                    + announced.to_bytes(4, "little") + b"\x00" * 1024)  # dropped unread
                assert "clientID" in (await _hello(ws, token))["result"]  # the connection still serves

    asyncio.run(probe())
    cap = 2 * 2 ** 20  # --max-upload-mb 1 plus 1 MB for the message envelope
    deadline = time.monotonic() + 10
    while f"refused a {announced}-byte message over the {cap}-byte limit" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


# --- item 4 (web part): model cards and the demo MRI are read off the event loop ---------------------------
WEB_APP_CHECK = """
import asyncio, json, sys, threading
from pathlib import Path
from trame.app import get_server
from UNet3DSegmentLib.web import app as web_app

first, many, folder, temporary = map(Path, sys.argv[1:5])
on_main_thread = []
original = web_app.UNet3DSegmentLogic.modelCard.__func__

def spy(cls, model=None):
    on_main_thread.append(threading.current_thread() is threading.main_thread())
    return original(cls, model)

web_app.UNet3DSegmentLogic.modelCard = classmethod(spy)
app = web_app.UNet3DSegmentWebApp(server=get_server("security", client_type="vue3"), model=first, models_dir=folder,
                                  temporary_root=temporary, demo_downsample=4)
result = {"initial": app.state.card_title}
on_main_thread.clear()

async def choose(path):
    app.state.model_path = str(path)
    await app.on_model_changed(str(path))

asyncio.run(choose(many.resolve()))
result.update(main_thread=on_main_thread, classes=len(app.state.card_classes), card_error=app.state.card_error)
asyncio.run(choose("/etc/hostname"))
result["probe_error"] = app.state.card_error
app.state.update({"trust_model": True})  # whatever the browser sends
result["trust"] = app._options().trust_model
result["demo"] = Path(app._demo.result(timeout=120)).is_file()
app.close()
print("RESULT " + json.dumps(result))
"""


def test_web_app_reads_cards_off_the_event_loop_and_never_takes_trust_from_the_page(tmp_path: Path) -> None:
    """In a child process: VTK's off-screen rendering and TensorFlow (loaded by the other tests) do not mix."""
    pytest.importorskip("trame_slicer")
    import copy
    import subprocess

    folder = tmp_path / "models"
    first = save_tiny_model(folder, name="first")
    card = copy.deepcopy(TINY_CARD)
    card["classes"] += [{"name": f"Structure {i}"} for i in range(300)]  # a card with very many classes
    many = save_tiny_model(folder, name="many", card={**card, "classes": card["classes"][:4]})
    (folder / "many.json").write_text(json.dumps(card))
    run = subprocess.run([sys.executable, "-c", WEB_APP_CHECK, str(first), str(many), str(folder), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["initial"].startswith("tiny-test-model")
    assert result["main_thread"] == [False]  # read (and checked) in a worker thread, not on the event loop
    assert result["classes"] == 303 and result["card_error"] == ""
    assert "choose one of the listed models" in result["probe_error"] and "hostname" not in result["probe_error"]
    assert result["trust"] is False
    assert result["demo"] is True  # prepared in the background from the start
