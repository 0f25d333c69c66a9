"""The ``ray`` engine of ``unet3d-segment batch``: a pool of Ray actors, one loaded model each.

Ray is optional (``pip install 'unet3dsegment[ray]'``) and imported only here, inside functions.

- Without ``--address`` a local Ray instance is started (and shut down at the end); with it the run
  joins that cluster (``ray://head:10001``, or ``auto`` on a cluster node).
- **Shared filesystem**: actors read each case's input files and write its output by path, so
  INPUT and OUTDIR must be the same paths on every node (NFS, Lustre, a shared PVC on Kubernetes).
  Only case names, paths and result rows travel through Ray, never voxels; the driver writes
  results.csv and summary.json.
- Each actor is a :class:`~.cohort.CaseWorker` (the same steps as the local engine, so the same
  labelmaps voxel for voxel), created with ``num_cpus=1``, ``num_gpus=--gpus-per-worker`` and two
  concurrent calls (``run`` and ``cancel``).
- A worker that dies (killed, out of host memory, node lost) is replaced by a fresh actor and its
  case is retried once, on another actor; a second death of the same case is that case's error row.
- Start-up: ``ray.init`` installs its own SIGTERM handler; the command's (cancel) is put back right
  after it and at the end. The driver waits for the actors in short steps, checking cancel, and
  gives up after ``ACTOR_START_TIMEOUT_S`` with one line naming the resources asked for and
  ``ray.available_resources()`` (actors that can never be placed would otherwise wait forever).
- Cancel: every busy actor is asked to stop between batches (its temporaries are removed, nothing
  half-written), the finished rows are kept, and the actors are ended.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..base.errors import BadInputError, BadModelError, CancelledError
from ..base.options import BatchOptions
from .cases import Case

INSTALL_HINT = "pip install 'unet3dsegment[ray]'"
ACTOR_START_TIMEOUT_S = 60.0  # how long the actors may take to be placed and load the model


def _restore_sigterm(handler: Any) -> None:
    if handler is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not handler:
            signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, TypeError):
        pass


def import_ray() -> Any:
    """The ``ray`` module, or a one-line bad-input error naming the install command."""
    try:
        import ray
    except ImportError as error:
        raise BadInputError(f"--engine ray needs Ray, which is not installed; {INSTALL_HINT}") from error
    return ray


def _runtime_env() -> dict:
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding UNet3DSegmentLib
    paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
                         "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}}


def run_on_ray(todo: Sequence[Case], book: Any, spec: tuple, batch: BatchOptions, cancel: threading.Event,
               ray_init: dict) -> None:
    """Run ``todo`` on an actor pool; rows go to ``book.record`` as they finish."""
    ray = import_ray()
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from .case_worker import CaseWorker, describe_failure

    started_here = not ray.is_initialized()
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it: the command's cancel would be lost
    if started_here:
        kwargs: dict = {"address": batch.address, "log_to_driver": False, "runtime_env": _runtime_env()}
        if not batch.address:  # a local instance of our own (joining a cluster takes no such arguments)
            kwargs["include_dashboard"] = False
        kwargs.update(ray_init)
        try:
            ray.init(**kwargs)
        finally:
            _restore_sigterm(sigterm)
    actor_class = ray.remote(CaseWorker)
    pids: dict[Any, Any] = {}

    def new_actor() -> Any:
        actor = actor_class.options(num_cpus=1, num_gpus=batch.gpus_per_worker, max_concurrency=2,
                                    max_restarts=0, max_task_retries=0).remote(*spec)
        pids[actor] = actor.pid.remote()
        return actor

    def pid_of(actor: Any) -> Optional[int]:
        ready, _ = ray.wait([pids[actor]], timeout=0)
        try:
            return ray.get(ready[0]) if ready else None
        except RayActorError:
            return None

    book.retries = 0
    try:
        actors = [new_actor() for _ in range(batch.workers)]
        _wait_for_actors(ray, list(pids.values()), batch, cancel, RayActorError)
        idle = list(actors)
        queue: list[tuple[Case, int]] = [(case, 0) for case in todo]
        running: dict[Any, tuple[Any, Case, int]] = {}
        asked_to_stop = False
        while queue or running:
            if cancel.is_set() and not asked_to_stop:
                asked_to_stop = True
                queue.clear()
                for actor, _, _ in running.values():
                    actor.cancel.remote()
            while queue and idle and not cancel.is_set():
                case, attempt = queue.pop(0)
                actor = idle.pop(0)
                book.start(case, worker=pid_of(actor), attempt=attempt + 1)
                running[actor.run.remote(case)] = (actor, case, attempt)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            for ref in ready:
                actor, case, attempt = running.pop(ref)
                try:
                    row = ray.get(ref)
                except CancelledError:  # the actor stopped this case on cancel: no row
                    idle.append(actor)
                    continue
                except RayActorError as error:  # the worker died: replace it, retry the case once
                    replacement = new_actor()
                    idle.append(replacement)
                    if attempt == 0 and not cancel.is_set():
                        book.retries += 1
                        queue.insert(0, (case, 1))
                    elif not cancel.is_set():
                        book.record({"case": case.name, "status": "error", "output": "", "seconds": 0.0,
                                     "message": f"the worker died twice on this case (most likely out of "
                                     f"memory): {_one_line(error)}"[:500]})
                    continue
                except (RayTaskError, GetTimeoutError) as error:
                    idle.append(actor)
                    book.record({"case": case.name, "status": "error", "output": "", "seconds": 0.0,
                                 "message": describe_failure(error)})
                    continue
                idle.append(actor)
                book.record(row, worker=pid_of(actor), attempt=attempt + 1)
    finally:
        for actor in list(pids):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started_here:
            ray.shutdown()
        _restore_sigterm(sigterm)
    if cancel.is_set():
        raise CancelledError("cancelled")


def _wait_for_actors(ray: Any, refs: list, batch: BatchOptions, cancel: threading.Event,
                     actor_error: type) -> None:
    """Every actor has loaded its model (a bad model is one error, not a failure per case); waits in
    short steps (cancel is honoured) and at most ``ACTOR_START_TIMEOUT_S``."""
    deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
    pending = list(refs)
    while pending:
        if cancel.is_set():
            raise CancelledError("cancelled while the Ray workers were starting")
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        try:
            ray.get(list(ready))
        except actor_error as error:
            raise BadModelError(f"a Ray worker could not start: {_one_line(error)}") from error
        if pending and time.monotonic() >= deadline:
            try:
                available = ray.available_resources()
            except Exception:  # noqa: BLE001 - only for the message
                available = "unknown"
            raise BadInputError(
                f"{len(pending)} of {len(refs)} Ray worker(s) did not start within {ACTOR_START_TIMEOUT_S:g} s; "
                f"each asks for {{'CPU': 1, 'GPU': {batch.gpus_per_worker:g}}} and the cluster has {available} "
                f"available; lower --workers or --gpus-per-worker, or add nodes")


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
