"""Cohort segmentation (``unet3d-segment batch``): many cases, the model loaded once per worker.

:func:`segment_cohort` finds the cases (``engine/cases.py``), skips those already done (resume: the
output exists and ``results.csv`` says ``ok``), runs the rest on an engine and writes

- ``OUTDIR/<case>.<format>`` per case, atomically, on the case's own grid (as ``segment`` does);
- ``OUTDIR/results.csv``: one row per case (``case``, ``status`` ok/error/skipped, ``output``,
  ``seconds``, ``message``, ``warnings`` (the input checks'), one ``<class> [mL]`` column per
  non-background class, ``confidence``: the mean max-probability over the case's foreground voxels),
  rewritten atomically at most every ``SAVE_INTERVAL_S`` seconds and at the end or on cancel, so after
  a crash it lists what was done up to the last few seconds (resume recomputes the rest);
- ``OUTDIR/summary.json``: counts, total and per-case time, versions, the options used, and the
  run's ``fingerprint`` (model file size and time, options, format, version; written at the start
  too): resume skips a case only under the same fingerprint.

Engines: ``local`` (this module): one worker in this process, a thread reading the next case's
files while the current one runs on the model; ``workers > 1`` starts that many worker processes,
each with its own loaded model. ``ray`` (``engine/ray_engine.py``): an actor pool on a Ray instance.
Every engine runs each case with the same :class:`CaseWorker`, so the results are the same voxel
for voxel.

A failing case (corrupt file, wrong grid, out of memory) is one ``error`` row and the others go on.
Cancel (the ``cancel`` event: SIGTERM, Ctrl+C) stops between batches of the running cases; nothing
half-written is left (outputs are temporary files renamed into place), the table and summary are
written, and :class:`CancelledError` is raised.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..base.errors import BadInputError, BadModelError, CancelledError
from ..base.options import BatchOptions, SegmentOptions
from .case_worker import CONFIDENCE_COLUMN, CaseWorker, Row, describe_failure, output_name, volume_column
from .cases import Case, discover_cases
from .progress import ProgressCallback, ProgressEmitter

PathLike = Union[str, Path]
RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.json"
BASE_COLUMNS = ("case", "status", "output", "seconds", "message", "warnings")
DONE_STATUSES = ("ok", "skipped")
SAVE_INTERVAL_S = 2.0  # results.csv is rewritten at most this often (and at the end / on cancel)


# -------------------------------------------------------------------------------- results table
def read_results(path: Path) -> dict[str, Row]:
    """The rows of an earlier ``results.csv`` by case (empty if none or unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return {row["case"]: dict(row) for row in csv.DictReader(handle) if row.get("case")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def results_columns(rows: Iterable[Row], class_names: Sequence[str]) -> list[str]:
    columns = list(BASE_COLUMNS) + [volume_column(n) for n in class_names]
    for row in rows:
        for key in row:
            if key not in columns and key != CONFIDENCE_COLUMN:
                columns.append(key)
    return columns + [CONFIDENCE_COLUMN]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_text_atomically(path: Path, text: str) -> None:
    from .image_io import atomic_write

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    try:
        atomic_write(path, write, overwrite=True)
    except OSError as error:
        raise BadInputError(f"cannot write {path}: {error.strerror or error}; check that OUTDIR is writable "
                            f"and has free space") from error


def write_results(path: Path, rows: Sequence[Row], class_names: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=results_columns(rows, class_names), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})
    write_text_atomically(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------- run
@dataclass
class CohortResult:
    """What ``segment_cohort`` did: the rows in case order, where the table is, and counts."""

    rows: list[Row]
    results_path: Path
    summary_path: Path
    seconds: float
    summary: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row.get("status") == status)

    @property
    def all_ok(self) -> bool:
        return all(row.get("status") in DONE_STATUSES for row in self.rows)


class _Book:
    """The rows of a run, rewritten to results.csv after each case, and cohort-level progress events."""

    def __init__(self, cases: Sequence[Case], rows: dict[str, Row], path: Path, class_names: Sequence[str],
                 emitter: ProgressEmitter, workers: int) -> None:
        self.order = [c.name for c in cases]
        self.rows = rows
        self.path = path
        self.class_names = class_names
        self.emitter = emitter
        self.workers = workers
        self.todo = sum(1 for name in self.order if rows.get(name, {}).get("status") != "skipped")
        self.finished = 0
        self.done = sum(1 for name in self.order if name in rows)  # a running count (no scan per case)
        self.lock = threading.Lock()
        self.started = time.perf_counter()
        self.saved_at: Optional[float] = None

    def ordered(self) -> list[Row]:
        return [self.rows[name] for name in self.order if name in self.rows]

    def save(self, force: bool = True) -> None:
        """Rewrite results.csv (atomically); ``force=False``: only if the last write is over
        ``SAVE_INTERVAL_S`` old, so a large cohort is not rewritten after every case (quadratic)."""
        now = time.monotonic()
        if not force and self.saved_at is not None and now - self.saved_at < SAVE_INTERVAL_S:
            return
        try:
            write_results(self.path, self.ordered(), self.class_names)
        except OSError as error:
            raise BadInputError(f"cannot write {self.path}: {error.strerror or error}; check that OUTDIR is "
                                f"writable and has free space") from error
        self.saved_at = now

    def start(self, case: Case, **extra: Any) -> None:
        self.emitter.emit("case", self.done_count(), len(self.order), f"segmenting {case.name}", case=case.name,
                          status="running", **extra)

    def done_count(self) -> int:
        return self.done

    def record(self, row: Row, **extra: Any) -> None:
        with self.lock:
            if row["case"] not in self.rows:
                self.done += 1
            self.rows[row["case"]] = row
            self.finished += 1
            self.save(force=False)
            elapsed = time.perf_counter() - self.started
            left = elapsed / self.finished * (self.todo - self.finished)
            done = self.done_count()
            text = f"case {done}/{len(self.order)} {row['case']}: {row['status']} ({row.get('seconds', 0):.1f} s)"
            if row["status"] == "error":
                text += f": {row['message']}"
            self.emitter.emit("case", done, len(self.order), text + f", ~{left:.0f} s left", case=row["case"],
                              status=row["status"], seconds_left=round(left, 1), **extra)


def segment_cohort(
    source: PathLike,
    outdir: PathLike,
    model: Optional[PathLike] = None,
    options: SegmentOptions = SegmentOptions(),
    batch: BatchOptions = BatchOptions(),
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[threading.Event] = None,
    ray_init: Optional[dict] = None,
) -> CohortResult:
    """Segment every case of ``source`` (a folder or a CSV, see ``engine/cases.py``) into ``outdir``.

    Returns the rows; raises :class:`CancelledError` (after writing the table) when ``cancel`` was
    set. ``ray_init``: extra ``ray.init`` keyword arguments for ``batch.engine == "ray"`` (tests).
    From Slicer's Python console: ``segment_cohort("/data/scans", "/data/out", overwrite=False)``.
    """
    from .bundled_models import default_model_path
    from .card import card_for_model

    cancel = cancel or threading.Event()
    emitter = ProgressEmitter(progress)
    model_path = Path(model) if model else default_model_path()
    if not model_path.exists():
        raise BadInputError(f"model {model_path} does not exist; check --model") if model else \
            BadInputError(f"bundled model {model_path} is missing; pass --model")
    card = card_for_model(model_path)
    channels = list(card.input.channels) if card is not None else None
    class_names = [c.name for c in card.classes[1:]] if card is not None else []
    cases = discover_cases(source, channels)
    outdir = Path(outdir).expanduser().absolute()
    results_path = outdir / RESULTS_NAME
    summary_path = outdir / SUMMARY_NAME
    _check_outdir_apart(Path(source).expanduser().absolute(), outdir, cases, batch.format)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the output folder {outdir}: {error.strerror or error}; choose "
                            f"another OUTDIR") from error
    fingerprint = run_fingerprint(model_path, options, batch.format)
    previous = {} if overwrite else read_results(results_path)
    earlier = None if overwrite else read_fingerprint(summary_path)
    if not overwrite and (previous or earlier is not None) and earlier != fingerprint:
        raise BadInputError(f"the earlier run in {outdir} used another model or other options (or another "
                            f"version or --format); pass --overwrite to recompute every case, or another OUTDIR")
    ours = earlier is not None  # same fingerprint: a recomputed case may replace its own earlier output
    rows: dict[str, Row] = {}
    todo: list[Case] = []
    for case in cases:
        old = previous.get(case.name)
        target = outdir / output_name(case, batch.format)
        if old is not None and old.get("status") in DONE_STATUSES and _up_to_date(case, target):
            rows[case.name] = {**old, "status": "skipped", "output": str(target),
                               "message": "done in an earlier run (--overwrite to recompute)"}
        else:
            todo.append(replace(case, replace=True) if ours and target.exists() else case)
    book = _Book(cases, rows, results_path, class_names, emitter, batch.workers)
    book.save()
    write_text_atomically(summary_path, json.dumps({"fingerprint": fingerprint, "running": True}, indent=2) + "\n")
    emitter.emit("load", 0, len(cases), f"{len(cases)} case(s), {len(todo)} to segment, engine {batch.engine} "
                 f"x{batch.workers}")
    if batch.workers > 1 and options.threads is None and not batch.address:
        # Workers share this machine's cores rather than each taking all of them.
        options = SegmentOptions.from_values({"threads": max(1, (os.cpu_count() or 1) // batch.workers)}, options)
    argv = options.to_argv()
    worker_spec = (str(model_path), argv, str(outdir), batch.format, overwrite)
    if todo and batch.engine != "ray" and batch.workers > 1:
        check_model_file(model_path, options.trust_model)  # a bad model: exit 4 here, not a broken pool
    cancelled = False
    try:
        if todo:
            if batch.engine == "ray":
                from .ray_engine import run_on_ray

                run_on_ray(todo, book, worker_spec, batch, cancel, ray_init or {})
            elif batch.workers == 1:
                _run_in_process(todo, book, worker_spec, cancel)
            else:
                _run_in_processes(todo, book, worker_spec, batch.workers, cancel)
    except CancelledError:
        cancelled = True
    except BaseException:  # another error stops the run: keep the rows so far (throttled saves) first
        try:
            book.save()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    if cancel.is_set():
        cancelled = True
    seconds = time.perf_counter() - book.started
    book.save()
    summary = _summary(book, cases, seconds, model_path, options, batch, overwrite, cancelled)
    summary["fingerprint"] = fingerprint
    write_text_atomically(summary_path, json.dumps(summary, indent=2) + "\n")
    result = CohortResult(book.ordered(), results_path, summary_path, seconds, summary)
    if cancelled:
        raise CancelledError(f"cancelled after {len(book.ordered())} of {len(cases)} case(s); {results_path} lists "
                             f"them; run again to resume")
    emitter.emit("done", len(cases), len(cases), f"{result.count('ok')} ok, {result.count('skipped')} skipped, "
                 f"{result.count('error')} failed; table {results_path}", output=str(results_path))
    return result


def run_fingerprint(model_path: Path, options: SegmentOptions, fmt: str) -> dict:
    """What decides a case's output: the model file (size, modification time), the options, the
    format and the package version. Resume skips a case only under the same fingerprint."""
    from .. import __version__

    stat_path = model_path / "saved_model.pb" if model_path.is_dir() else model_path
    try:
        stat = stat_path.stat()
        model = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        model = {"size": None, "mtime_ns": None}
    return json.loads(json.dumps({"model": model, "options": list(options.to_argv()), "format": fmt,
                                  "version": __version__}))


def read_fingerprint(path: Path) -> Optional[dict]:
    """The ``fingerprint`` of an earlier run's summary.json (None: no summary; {}: one without it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data.get("fingerprint", {}) if isinstance(data, dict) else {}


def _up_to_date(case: Case, target: Path) -> bool:
    """The output exists and no input of the case is newer than it."""
    try:
        written = target.stat().st_mtime_ns
        return all(p.stat().st_mtime_ns <= written for p in case.paths)
    except OSError:
        return False


def _check_outdir_apart(source: Path, outdir: Path, cases: Sequence[Case], fmt: str) -> None:
    """OUTDIR is not INPUT nor inside it (folder input), and no output path is an input path."""
    out = outdir.resolve()
    if source.is_dir():
        inside = source.resolve()
        if out == inside or inside in out.parents:
            raise BadInputError(f"OUTDIR {outdir} is INPUT {source} or inside it; choose an output folder "
                                f"outside the input folder")
        return
    inputs = {source.resolve()} | {p.expanduser().absolute().resolve() for c in cases for p in c.paths}
    targets = [out / RESULTS_NAME, out / SUMMARY_NAME] + [out / output_name(c, fmt) for c in cases]
    for target in targets:
        if target in inputs:
            raise BadInputError(f"output {target} would replace an input of {source}; choose another OUTDIR")


def check_model_file(model_path: Path, trust: bool) -> None:
    """Cheap checks of the model file in the parent before worker processes start (they would
    each fail to load it and break the pool): its kind, its container, a SavedModel's safety."""
    import zipfile

    from .loading import _model_kind

    kind = _model_kind(model_path)
    if kind == "keras" and not zipfile.is_zipfile(model_path):
        raise BadModelError(f"model {model_path.name} is not a readable .keras file (not a zip archive); "
                            f"check that it was copied whole")
    if kind == "h5":
        with open(model_path, "rb") as handle:
            if handle.read(8) != b"\x89HDF\r\n\x1a\n":
                raise BadModelError(f"model {model_path.name} is not a readable .h5 file (no HDF5 signature); "
                                    f"check that it was copied whole")
    if kind == "saved_model" and not trust:
        from .savedmodel_safety import check_saved_model

        check_saved_model(model_path)


def _summary(book: _Book, cases: Sequence[Case], seconds: float, model_path: Path, options: SegmentOptions,
             batch: BatchOptions, overwrite: bool, cancelled: bool) -> dict:
    from .. import __version__

    rows = book.ordered()
    ran = [r for r in rows if r.get("status") in ("ok", "error") and r.get("case") in book.rows
           and isinstance(r.get("seconds"), (int, float))]
    per_case = [r["seconds"] for r in ran]
    versions = {"unet3dsegment": __version__, "python": platform.python_version()}
    from importlib import metadata

    for name in ("numpy", "SimpleITK", "keras", "ray", "tensorflow", "jax", "torch"):
        try:  # the installed distributions, read without importing them
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cases": len(cases),
        "ok": sum(1 for r in rows if r.get("status") == "ok"),
        "skipped": sum(1 for r in rows if r.get("status") == "skipped"),
        "error": sum(1 for r in rows if r.get("status") == "error"),
        "not_run": len(cases) - len(rows),
        "cancelled": cancelled,
        "retries": getattr(book, "retries", 0),
        "total_seconds": round(seconds, 3),
        "case_seconds": {r["case"]: r["seconds"] for r in ran},
        "mean_case_seconds": round(sum(per_case) / len(per_case), 3) if per_case else None,
        "model": str(model_path),
        "engine": batch.engine,
        "options": {"segment": _values(options), "batch": _values(batch),
                    "overwrite": overwrite},
        "versions": versions,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def _values(group: Any) -> dict:
    return {o.name: getattr(group, o.name) for o in type(group).options()}


# ---------------------------------------------------------------------------------- local engine
def _read_case(case: Case) -> Any:
    """The case's channels, or the exception reading them raised (raised again by the worker)."""
    from .image_io import read_channels

    started = time.perf_counter()
    try:
        images = _Images(read_channels(list(case.paths)))
    except Exception as error:  # noqa: BLE001 - becomes the case's error row
        return error
    images.read_seconds = time.perf_counter() - started
    return images


class _Images(list):
    """The channels of a case, with the seconds reading them took (counted in the case's time)."""

    read_seconds = 0.0


def _run_in_process(todo: Sequence[Case], book: _Book, spec: tuple, cancel: threading.Event) -> None:
    """One worker in this process; a reader thread reads case i+1 while case i runs on the model."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-reader") as reader:
        pending: Optional[Future] = reader.submit(_read_case, todo[0])  # read while the model loads
        worker = CaseWorker(*spec)
        for index, case in enumerate(todo):
            if cancel.is_set():
                raise CancelledError("cancelled")
            images = pending.result()
            pending = reader.submit(_read_case, todo[index + 1]) if index + 1 < len(todo) else None
            book.start(case, worker=os.getpid())
            book.record(worker.run(case, images, cancel), worker=os.getpid())


_PROCESS_WORKER: Optional[CaseWorker] = None
_PROCESS_CANCEL: Any = None


def _process_init(spec: tuple, cancel: Any) -> None:
    global _PROCESS_WORKER, _PROCESS_CANCEL
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl+C and sets the shared event
    _PROCESS_CANCEL = cancel
    _PROCESS_WORKER = CaseWorker(*spec)


def _process_run(case: Case) -> tuple[Optional[Row], int]:
    assert _PROCESS_WORKER is not None
    try:
        return _PROCESS_WORKER.run(case, None, _PROCESS_CANCEL), os.getpid()
    except CancelledError:
        return None, os.getpid()


def _run_in_processes(todo: Sequence[Case], book: _Book, spec: tuple, workers: int,
                      cancel: threading.Event) -> None:
    """``workers`` processes (spawned), each with its own loaded model, take the cases in turn.

    A worker process that dies (killed, out of host memory) breaks the pool: the cases that were
    running are retried once in a new pool, each retry alone (so a second death is surely that
    case's): its ``error`` row; every other case goes on.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    shared = context.Event()
    queue: list[tuple[Case, int]] = [(case, 0) for case in todo]
    book.retries = getattr(book, "retries", 0)

    def died(case: Case, attempt: int, error: BaseException, retry: list) -> None:
        if cancel.is_set():
            return
        if attempt == 0:
            book.retries += 1
            retry.append((case, 1))
        else:
            book.record({"case": case.name, "status": "error", "output": "", "seconds": 0.0,
                         "message": f"the worker process died twice on this case (out of memory, killed, or the "
                         f"model could not be loaded in it): "
                         f"{describe_failure(error)}"[:500]})

    while queue and not cancel.is_set():
        retry: list[tuple[Case, int]] = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_process_init,
                                 initargs=(spec, shared)) as pool:
            running: dict[Future, tuple[Case, int]] = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < workers and not cancel.is_set():
                    if any(a > 0 for _, a in running.values()) or (queue[0][1] > 0 and running):
                        break  # a retry runs alone
                    case, attempt = queue.pop(0)
                    book.start(case, attempt=attempt + 1)
                    try:
                        running[pool.submit(_process_run, case)] = (case, attempt)
                    except BrokenProcessPool as error:
                        died(case, attempt, error, retry)
                        broken = True
                        break
                if cancel.is_set():
                    shared.set()
                    queue.clear()
                if not running:
                    break
                finished, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
                for future in finished:
                    case, attempt = running.pop(future)
                    try:
                        row, pid = future.result()
                    except BrokenProcessPool as error:  # a worker died: the pool is gone
                        broken = True
                        died(case, attempt, error, retry)
                        continue
                    except Exception as error:  # noqa: BLE001 - that case's row says so
                        row, pid = {"case": case.name, "status": "error", "output": "", "seconds": 0.0,
                                    "message": describe_failure(error)}, 0
                    if row is not None:
                        book.record(row, worker=pid)
            if broken:  # every case still running in the broken pool failed with it
                wait(list(running))
                for future, (case, attempt) in list(running.items()):
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        died(case, attempt, error, retry)
                    elif error is None:
                        row, pid = future.result()
                        if row is not None:
                            book.record(row, worker=pid)
                    else:
                        book.record({"case": case.name, "status": "error", "output": "", "seconds": 0.0,
                                     "message": describe_failure(error)})
        queue[:0] = retry
    if cancel.is_set():
        raise CancelledError("cancelled")
