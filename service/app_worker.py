"""The warm application worker: one child process keeps the models loaded and serves
studies one at a time.

The child runs :func:`msk_node.pipeline.process_study`, the job the application's
operators run, so a study pays neither interpreter, Holoscan nor model start-up. The
parent kills and replaces the child after a crash, a timeout, or when its resident
memory passes a limit; that attempt fails with a one-line reason and the next study
gets a fresh warm child.

The application, warm child or one-shot command, runs in its own session and process
group: a signal to the node's terminal does not reach it, the node ends it with the
whole group (whatever it started included), and :class:`AppPidFile` records it in the
spool so that a node started after a crash ends what the crashed one left running.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from msk_node_service.spool import APP_UMASK, FILE_MODE
from msk_node.status import EXIT_INTERNAL_ERROR, Outcome

if TYPE_CHECKING:
    from msk_node.models import ModelSet

logger = logging.getLogger(__name__)

_POLL_S = 0.2
#: The format of ``app/__main__.py``, so an attempt's ``app.log`` reads the same either way.
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class AppResult:
    """What one application run came to; ``reason`` says why it failed."""

    ok: bool
    reason: str = ""
    elapsed_s: float = 0.0


class WarmAppError(RuntimeError):
    """The warm worker did not come up; the message says why."""


def _describe(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


# -- the application's process group ---------------------------------------------------

def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of ``/proc/<pid>/stat``);
    None when there is no such process. With the pid it names one process: a pid is reused,
    the pair is not."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])  # the command name, in parentheses, may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def kill_process_group(pid: int) -> bool:
    """SIGKILL the process group that process ``pid`` made (the application and whatever it
    started); False when there is none. A group outlives its leader while members remain,
    and its id is not given to a new process meanwhile."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class AppPidFile:
    """The application process the node runs, as JSON: ``pid``, ``start`` (see
    :func:`process_start`) and the ``job`` it works on (None between studies).

    Parameters
    ----------
    path : pathlib.Path
        In the node's spool, so the next node on it finds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, pid: int, job_id: int | None) -> None:
        """Record ``pid`` (running ``job_id``); written whole (temp + rename), mode 0600."""
        start = process_start(pid)
        if start is None:  # already gone: nothing to end later
            self.clear(pid)
            return
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": pid, "start": start, "job": job_id}, handle)
        os.replace(temp, self.path)

    def clear(self, pid: int | None = None) -> None:
        """Remove the record (only if it names ``pid``, when given)."""
        if pid is None or self.read().get("pid") == pid:
            self.path.unlink(missing_ok=True)

    def read(self) -> dict:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def end_leftover(self) -> dict | None:
        """End the application a previous node left running, then forget it.

        Returns
        -------
        dict or None
            The record (``pid``, ``start``, ``job``) when its process still ran (same pid
            and start time) and was killed with its group; None when there was nothing to
            end: no record, or its pid is gone or now names another process.
        """
        record = self.read()
        pid, start = record.get("pid"), record.get("start")
        ended = None
        if isinstance(pid, int) and pid > 0 and pid != os.getpid() and start is not None \
                and process_start(pid) == start:
            if not kill_process_group(pid):
                try:
                    os.kill(pid, signal.SIGKILL)  # checked just above: still that process
                except ProcessLookupError:
                    pass
            ended = record
        self.path.unlink(missing_ok=True)
        return ended


# -- the child -------------------------------------------------------------------------

def _exit_with_parent(parent_pid: int) -> None:
    # The child reads the pipe only between studies, so a node killed with -9 during a
    # study would go unnoticed until inference ends; polling the parent ends the orphan.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _serve(conn: Connection, models_dir: str, parent_pid: int) -> None:
    """The child: load the models once, then answer ``(input, output, log)`` requests."""
    os.setsid()  # its own process group: the node ends it with what it starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when it ends
    os.umask(APP_UMASK)  # results and logs are patient data
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    begin = time.monotonic()
    try:
        # Imported here: the node process never loads torch and the models.
        from msk_node.models import load_models
        from msk_node.pipeline import process_study

        models = load_models(Path(models_dir))
    except Exception as error:  # noqa: BLE001 - reported to the parent as the reason
        conn.send(("failed", _describe(error)))
        return
    conn.send(("ready", time.monotonic() - begin))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent closed the pipe
            return
        conn.send(_run_study(process_study, models, *map(Path, request)))


def _run_study(process_study: Callable[[Path, Path, ModelSet], object], models: ModelSet, input_dir: Path,
               output_dir: Path, log_path: Path) -> AppResult:
    """One study, with the root logger also writing to the attempt's own log."""
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    begin = time.monotonic()
    try:
        logger.info("warm worker %d; models: %s", os.getpid(), models.provenance())
        process_study(input_dir, output_dir, models)
        return AppResult(True, elapsed_s=time.monotonic() - begin)
    except Exception as error:  # noqa: BLE001 - one bad study fails its attempt; the worker serves the next
        logger.exception("study failed")
        from msk_node.pipeline import write_status  # loaded with the models already
        write_status(output_dir, Outcome.NOT_RUN, f"internal error: {_describe(error)}",
                     exit_code=EXIT_INTERNAL_ERROR)
        return AppResult(False, _describe(error), time.monotonic() - begin)
    finally:
        root.removeHandler(handler)
        handler.close()


# -- the parent ------------------------------------------------------------------------

class WarmApp:
    """The parent's handle on the warm child.

    Parameters
    ----------
    models_dir : pathlib.Path
        Passed to :func:`msk_node.models.load_models` in the child.
    memory_limit_mb : int, optional
        Resident memory above which the child is killed (during a study: the attempt
        fails) and replaced; None for no limit.
    pid_file : AppPidFile, optional
        Where the child and its current job are recorded.
    """

    def __init__(self, models_dir: Path, memory_limit_mb: int | None = None,
                 pid_file: AppPidFile | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.memory_limit_mb = memory_limit_mb
        self.pid_file = pid_file
        # spawn, not fork: the node has threads, and a forked child could inherit a held lock.
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once the child has loaded the models and waits for studies."""
        return self._ready

    @property
    def pid(self) -> int | None:
        """The child's process id; None when there is no child."""
        return self._process.pid if self._process is not None else None

    def start(self, should_stop: Callable[[], bool] = lambda: False, timeout_s: float = 3600.0) -> bool:
        """Start a child unless a live one is ready, and wait until it has loaded the models.

        Returns
        -------
        bool
            False when ``should_stop()`` became true first (the child is killed).

        Raises
        ------
        WarmAppError
            If loading failed, the child died, or it took longer than ``timeout_s``.
        """
        if self._ready and self._process is not None and not self._process.is_alive():
            logger.warning("warm worker %d %s while idle; starting a fresh one", self.pid, self._exit_reason())
            self.stop()
        if self._ready:
            return True
        if self._process is None:
            self._spawn()
        assert self._conn is not None
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(_POLL_S):
            if should_stop():
                self.stop()
                return False
            if time.monotonic() > deadline:
                self.stop()
                raise WarmAppError(f"worker did not load the models within {timeout_s:g} s")
        try:
            kind, detail = self._conn.recv()
        except EOFError:
            reason = self._exit_reason()
            self.stop()
            raise WarmAppError(f"{reason} while loading the models") from None
        if kind != "ready":
            self.stop()
            raise WarmAppError(f"model load failed: {detail}")
        self._ready = True
        logger.info("warm worker %d ready: models loaded in %.1f s", self.pid, detail)
        if self._over_limit():
            logger.warning("warm worker %d is over worker_memory_limit_mb (%d MB) with only the models loaded",
                           self.pid, self.memory_limit_mb)
        return True

    def run(self, input_dir: Path, output_dir: Path, log_path: Path, timeout_s: float,
            should_stop: Callable[[], bool], job_id: int | None = None) -> AppResult | None:
        """Serve one study (of job ``job_id``); ``timeout_s`` counts from the hand-over to the ready child.

        Returns
        -------
        AppResult or None
            None when ``should_stop()`` interrupted the study (the child is killed).
        """
        try:
            if not self.start(should_stop, timeout_s):
                return None
        except WarmAppError as error:
            return AppResult(False, str(error))
        assert self._conn is not None
        begin = time.monotonic()
        self._record(job_id)
        try:
            self._conn.send((str(input_dir), str(output_dir), str(log_path)))
            while not self._conn.poll(_POLL_S):
                if should_stop():
                    self.stop()
                    return None
                reason = self._kill_reason(time.monotonic() - begin, timeout_s)
                if reason:
                    self._restart()
                    return AppResult(False, reason, time.monotonic() - begin)
            result: AppResult = self._conn.recv()
        except (EOFError, OSError):  # the child died: EOF on recv, broken pipe on send
            reason = self._exit_reason()
            self._restart()
            return AppResult(False, reason, time.monotonic() - begin)
        self._record(None)
        if self._over_limit():
            logger.info("warm worker %d is over %d MB after the study; replacing it", self.pid, self.memory_limit_mb)
            self._restart()
        return result

    def stop(self) -> None:
        """Kill the child and its process group (a study in progress is abandoned). Safe to call twice."""
        if self._process is not None:
            if self._process.pid is not None:
                kill_process_group(self._process.pid)
            self._process.kill()  # in case it had not made its group yet
            self._process.join()
            if self.pid_file is not None:
                self.pid_file.clear(self._process.pid)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn, self._ready = None, None, False

    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        # daemon: ended by multiprocessing's exit handler should the node exit without stop().
        self._process = self._context.Process(target=_serve, args=(child, str(self.models_dir), os.getpid()),
                                              name="msk-node-app", daemon=True)
        self._process.start()
        child.close()  # else our copy keeps the pipe open and a dead child is never seen as EOF
        self._conn = parent
        self._record(None)

    def _record(self, job_id: int | None) -> None:
        if self.pid_file is not None and self.pid is not None:
            self.pid_file.record(self.pid, job_id)

    def _restart(self) -> None:
        """Replace the child at once, so the next study finds the models loading or loaded."""
        self.stop()
        self._spawn()

    def _kill_reason(self, elapsed_s: float, timeout_s: float) -> str:
        if elapsed_s > timeout_s:
            return f"timed out after {timeout_s:g} s"
        if self._over_limit():
            return f"worker exceeded memory limit of {self.memory_limit_mb} MB"
        return ""

    def _over_limit(self) -> bool:
        if self.memory_limit_mb is None or self.pid is None:
            return False
        try:
            rss = psutil.Process(self.pid).memory_info().rss
        except psutil.Error:  # gone: the next poll sees it dead
            return False
        return rss > self.memory_limit_mb * 1024 * 1024

    def _exit_reason(self) -> str:
        """How the child ended: ``worker killed by signal 9``, ``worker exited with code 1``."""
        assert self._process is not None
        self._process.join(5.0)
        code = self._process.exitcode
        if code is None:
            return "worker stopped answering"
        return f"worker killed by signal {-code}" if code < 0 else f"worker exited with code {code}"
