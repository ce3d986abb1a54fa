"""The scheduler: studies become stable, jobs run one at a time, results go out once.

A study that settles is held while instances refused for lack of resources are missing,
and closed as skipped when the series-selection rules take none of its series
(:mod:`msk_node_service.triage`), before any job runs.

Jobs run in a warm worker process that keeps the models loaded
(:mod:`msk_node_service.app_worker`), or, when ``app_command`` is set, as a one-shot
subprocess ``app_command -i IN -o OUT -m MODELS``. Either way a crash, a hang (timeout)
or a memory blow-up fails one attempt and the node goes on; the warm worker is replaced
by a fresh one. Failed attempts are retried with exponential backoff up to
``max_attempts``; then the job is ``dead`` and its reason stays visible in ``msk-node
status``. Results are delivered per instance per destination, each confirmation recorded
at once, so a restart sends only what was not confirmed; a destination that is down
keeps the job in ``delivering`` and is tried again with backoff. An instance sent but not
confirmed when the node died is first looked up at the destination and sent only if it
is not there. Destinations with ``storage_commitment`` are asked to commit what they
confirmed; their reports reach the listener.
"""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.uid import generate_uid

from msk_node.selection import load_rules
from msk_node_service.app_worker import AppPidFile, AppResult, WarmApp, WarmAppError, kill_process_group
from msk_node_service.config import Destination, NodeConfig
from msk_node_service.delivery import (
    DeliveryError,
    ResultFile,
    find_stored,
    read_results,
    request_commitment,
    send,
)
from msk_node_service.jobs import Job, JobStore
from msk_node_service.spool import APP_UMASK, DIR_MODE, Spool, open_private
from msk_node_service.triage import judge_study
from msk_node.status import STATUS_FILE, Outcome

logger = logging.getLogger(__name__)

_WAIT_STEP_S = 0.2
#: The application process the node runs, in the spool (see :class:`AppPidFile`).
APP_PID_FILE = "app.pid"


def failure_reason(log_path: Path, returncode: int | None) -> str:
    """A one-line reason from the application's exit status and the end of its log.

    The last exception line after the last ``Traceback`` is preferred; otherwise the
    last non-empty line.
    """
    head = "killed by signal %d" % -returncode if returncode is not None and returncode < 0 \
        else f"exit code {returncode}"
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(size - 20000, 0))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return head
    lines = [line.rstrip() for line in lines if line.strip()]
    detail = ""
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tracebacks:
        candidates = [line for line in lines[tracebacks[-1] + 1:]
                      if not line[0].isspace() and not line.startswith("[")]
        detail = candidates[-1] if candidates else ""
    if not detail and lines:
        detail = lines[-1]
    return f"{head}: {detail[:300]}" if detail else head


def read_status(output_dir: Path) -> dict | None:
    """The application's status.json (README, "Status contract"); None where it wrote none (killed, crashed)."""
    try:
        status = json.loads((output_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and "outcome" in status else None


def status_verdict(status: dict) -> tuple[bool, str]:
    """Whether the study ran, and the reason the job records when it could not."""
    if status["outcome"] == Outcome.RAN:
        return True, ""
    return False, f"exit code {status.get('exit_code', '?')}: {status.get('reason') or 'no reason given'}"[:400]


def listed_results(output_dir: Path, status: dict | None) -> tuple[list[ResultFile], list[str]]:
    """The results to deliver: those status.json lists, else (no status) every readable ``*.dcm``."""
    results, problems = read_results(output_dir)
    if status is None or not isinstance(status.get("results"), list):
        return results, problems
    listed = {str(entry.get("file")) for entry in status["results"] if isinstance(entry, dict)}
    return [r for r in results if r.path.name in listed], problems


def success_summary(status: dict | None, n_results: int) -> str:
    """``"2 result(s); series: segmented 2; 1 step(s) failed; 1 input(s) skipped"`` from status.json."""
    text = f"{n_results} result(s)"
    if status is None:
        return text
    series = [s for s in status.get("series", []) if isinstance(s, dict)]
    outcomes = Counter(str(s.get("outcome", "?")) for s in series)
    if outcomes:
        text += "; series: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    failures = sum(len(s.get("failures", [])) for s in series)
    if failures:
        text += f"; {failures} step(s) failed"
    if status.get("skipped"):
        text += f"; {status['skipped']} input(s) skipped"
    return text


def run_command(command: list[str], cwd: Path, log_path: Path, timeout_s: float,
                should_stop: Callable[[], bool], pid_file: AppPidFile | None = None,
                job_id: int | None = None) -> AppResult | None:
    """Run a one-shot application, its output to ``log_path``, killed after ``timeout_s``.

    It runs in its own session and process group, killed as a whole; ``pid_file``
    records it (with ``job_id``) while it runs.

    Returns
    -------
    AppResult or None
        None when ``should_stop()`` interrupted it.
    """
    begin = time.monotonic()
    with open_private(log_path) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                   umask=APP_UMASK, start_new_session=True)
        if pid_file is not None:
            pid_file.record(process.pid, job_id)
        try:
            while True:
                try:
                    returncode = process.wait(timeout=_WAIT_STEP_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - begin
                if elapsed > timeout_s or should_stop():
                    kill_process_group(process.pid)
                    process.wait()
                    if elapsed > timeout_s:
                        return AppResult(False, f"timed out after {timeout_s:g} s", elapsed)
                    return None
            kill_process_group(process.pid)  # what it left running
        finally:
            if pid_file is not None:
                pid_file.clear(process.pid)
    elapsed = time.monotonic() - begin
    if returncode != 0:
        return AppResult(False, failure_reason(log_path, returncode), elapsed)
    return AppResult(True, elapsed_s=elapsed)


class Worker:
    """The scheduler thread.

    Parameters
    ----------
    config : NodeConfig
    spool : Spool
    store : JobStore
    """

    def __init__(self, config: NodeConfig, spool: Spool, store: JobStore) -> None:
        self.config = config
        self.spool = spool
        self.store = store
        #: Records the application process, so a node started after a crash can end it.
        self.pid_file = AppPidFile(spool.root / APP_PID_FILE)
        #: The warm worker; None when ``app_command`` runs a one-shot process per study.
        self.app = None if config.app_command else WarmApp(config.models_dir, config.worker_memory_limit_mb,
                                                           self.pid_file)
        #: The application's series-selection rules, applied to each stable study before it is queued.
        self.rules = load_rules() if config.preselect_series else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the scheduler thread."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the worker is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="msk-node-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; a running application is killed and its job
        goes back to ``stable`` without counting the attempt; the warm worker ends."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("worker did not stop within %.0f s", timeout)
            self._thread = None

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        logger.info("worker started")
        try:
            self._start_app()
            while not self._stop.is_set():
                try:
                    busy = self.step()
                except (sqlite3.Error, OSError) as error:
                    logger.error("worker step failed: %s", error)
                    busy = False
                except Exception:  # noqa: BLE001 - the scheduler must outlive a bug; the traceback is logged
                    logger.exception("worker step failed unexpectedly")
                    busy = False
                if not busy:
                    self._wake.wait(self.config.poll_interval_s)
                    self._wake.clear()
        finally:
            if self.app is not None:  # only this thread touches the warm worker
                self.app.stop()
        logger.info("worker stopped")

    def _start_app(self) -> None:
        """Load the models now, so the first study does not wait for them; on failure
        the first job tries again and fails with the reason."""
        if self.app is None:
            return
        try:
            self.app.start(self._stop.is_set, self.config.job_timeout_s)
        except WarmAppError as error:
            logger.error("warm worker did not start: %s", error)

    def step(self, now: float | None = None) -> bool:
        """One scheduling pass: mark settled studies stable, then run or deliver one job.

        Returns
        -------
        bool
            True if a job was worked on.
        """
        self.promote_stable(now)
        job = self.store.next_due(now)
        if job is None or self._stop.is_set():
            return False
        if job.state == "delivering":
            self.deliver(job)
        else:
            self.run(job)
        return True

    def promote_stable(self, now: float | None = None) -> list[int]:
        """``received`` -> ``stable`` for studies idle for their (per-AE) timeout; ``held`` when
        instances were refused for lack of resources, ``skipped`` when no series is one the
        application would select. All of them settle before any job runs, so a study to
        process never waits behind ones that will not be.

        Returns
        -------
        list of int
            Ids of the jobs that became ``stable`` (queued).
        """
        now = time.time() if now is None else now
        promoted = []
        for job, calling_ae, last_received in self.store.received_jobs():
            if now - last_received < self.config.stable_after(calling_ae):
                continue
            state = self.store.mark_stable(job.id, last_received, now)
            if state is None:
                continue
            study = self.store.study(job.study_uid) or {}
            if state == "held":
                logger.warning("job %d: study %s held with %s instance(s): %s", job.id, job.study_uid,
                               study.get("instance_count", "?"), self.store.job(job.id).reason)
                continue
            if self.rules is not None and self._skip_unselectable(job):
                continue
            logger.info("job %d: study %s stable with %s instance(s)", job.id, job.study_uid,
                        study.get("instance_count", "?"))
            promoted.append(job.id)
        return promoted

    def _skip_unselectable(self, job: Job) -> bool:
        """Close a stable job whose study has no series the rules select; True if it was closed."""
        verdict = judge_study(self.spool.instance_files(job.study_uid), self.rules)
        if verdict.selectable is None:
            self.store.note(job.id, f"series selection not checked before queueing: {verdict.reason}")
            return False
        if verdict.selectable or not self.store.skip(job.id, verdict.reason):
            return False
        logger.info("job %d: study %s skipped, nothing to segment: %d series (%s)", job.id, job.study_uid,
                    len(verdict.modalities), ", ".join(verdict.modalities) or "no image series")
        return True

    def run(self, job: Job) -> str:
        """Run the application once for ``job`` and record the outcome.

        Returns
        -------
        str
            The job's new state (``delivering``/``delivered``, ``failed``, ``dead``, or
            ``stable`` when a stop interrupted it).
        """
        folder = self.spool.new_attempt_dir(job.id)
        input_dir, output_dir, log_path = folder / "input", folder / "output", folder / "app.log"
        started = self.store.start_attempt(job.id, str(output_dir))
        if started is None:  # moved meanwhile (operator)
            folder.rmdir()
            return job.state
        count = self.spool.snapshot_study(job.study_uid, input_dir)
        self.store.set_input_instances(job.id, count)
        output_dir.mkdir(mode=DIR_MODE)
        logger.info("job %d: attempt %d of %d on study %s (%d instance(s))", job.id, started.attempts,
                    self.config.max_attempts, job.study_uid, count)
        result = self._run_app(job.id, folder, input_dir, output_dir, log_path)
        shutil.rmtree(input_dir, ignore_errors=True)
        if result is None:  # stopped by Node.stop()
            self.store.interrupt_attempt(job.id)
            logger.info("job %d: interrupted by stop; back to stable", job.id)
            return "stable"
        status = read_status(output_dir)
        # status.json decides; only an application that wrote none (killed) is judged by its exit and its log.
        ok, reason = status_verdict(status) if status is not None else (result.ok, result.reason)
        if ok:
            results, problems = listed_results(output_dir, status)
            reason = success_summary(status, len(results))
            if problems:
                reason += "; " + "; ".join(problems[:3])
        state = self.store.finish_attempt(job.id, ok, reason, self.config.max_attempts,
                                          self.config.backoff(started.attempts))
        if ok:
            logger.info("job %d: application finished in %.1f s: %s", job.id, result.elapsed_s, reason)
            return self.deliver(self.store.job(job.id))
        if state == "dead":
            logger.error("job %d: attempt %d of %d failed after %.1f s; job is dead: %s", job.id, started.attempts,
                         self.config.max_attempts, result.elapsed_s, reason)
        else:
            logger.warning("job %d: attempt %d of %d failed after %.1f s; next attempt in %.1f s: %s", job.id,
                           started.attempts, self.config.max_attempts, result.elapsed_s,
                           self.config.backoff(started.attempts), reason)
        return state

    def _run_app(self, job_id: int, folder: Path, input_dir: Path, output_dir: Path,
                 log_path: Path) -> AppResult | None:
        """The application on one attempt's folders, in the warm worker or as ``app_command``;
        None when a stop interrupted it."""
        if self.app is not None:
            return self.app.run(input_dir, output_dir, log_path, self.config.job_timeout_s, self._stop.is_set,
                                job_id)
        command = [*self.config.app_command, "-i", str(input_dir), "-o", str(output_dir),
                   "-m", str(self.config.models_dir)]
        return run_command(command, folder, log_path, self.config.job_timeout_s, self._stop.is_set,
                           self.pid_file, job_id)

    def deliver(self, job: Job) -> str:
        """Send the job's results to every destination not yet confirmed.

        Returns
        -------
        str
            ``delivered`` when every destination confirmed every result, else
            ``delivering`` (tried again after a backoff).
        """
        output_dir = Path(job.output_dir or "")
        status = read_status(output_dir)
        results, problems = listed_results(output_dir, status)
        errors = []
        sent = 0
        for destination in self.config.destinations:
            confirmed = self.store.delivered(job.id, destination.key)
            pending = [r for r in results if r.sop_uid not in confirmed]

            confirmed_now: set[str] = set()

            def confirm(sop_uid: str, key: str = destination.key) -> None:
                nonlocal sent
                self.store.record_delivery(job.id, key, sop_uid)
                confirmed_now.add(sop_uid)
                sent += 1

            def sending(sop_uids: Sequence[str], key: str = destination.key) -> None:
                self.store.record_sending(job.id, key, sop_uids)

            try:
                to_send = self._not_found_at(job.id, destination, pending)
                leaving = {r.sop_uid for r in to_send}
                confirmed_now.update(r.sop_uid for r in pending if r.sop_uid not in leaving)
                send(destination, to_send, confirm, self.config.ae_title, sending)
            except DeliveryError as error:
                errors.append(f"{destination.key}: {error}")
            if destination.storage_commitment and confirmed_now:
                self._request_commitment(job.id, destination, [r for r in pending if r.sop_uid in confirmed_now])
        summary = success_summary(status, len(results))
        if problems:
            summary += "; " + "; ".join(problems[:3])
        if not self.config.destinations:
            summary += "; no destinations configured"
        if errors:
            reason = "delivery pending: " + "; ".join(errors)
            self.store.finish_delivery(job.id, False, reason, self.config.backoff(job.delivery_tries + 1))
            logger.warning("job %d: %d result(s) sent, %s", job.id, sent, reason)
            return "delivering"
        self.store.finish_delivery(job.id, True, summary, 0.0)
        logger.info("job %d: delivered (%d instance(s) sent now) to %d destination(s)", job.id, sent,
                    len(self.config.destinations))
        return "delivered"

    def _request_commitment(self, job_id: int, destination: Destination, results: list[ResultFile]) -> None:
        """Ask ``destination`` to commit ``results``; its report arrives at the listener later."""
        transaction_uid = generate_uid()
        self.store.record_commitment_request(job_id, destination.key, transaction_uid, [r.sop_uid for r in results])
        try:
            request_commitment(destination, results, transaction_uid, self.config.ae_title)
        except DeliveryError as error:
            self.store.note(job_id, f"storage commitment not requested from {destination.key}: {error}")
            logger.warning("job %d: storage commitment not requested: %s", job_id, error)
            return
        logger.info("job %d: storage commitment of %d instance(s) requested from %s (transaction %s)", job_id,
                    len(results), destination.key, transaction_uid)

    def _not_found_at(self, job_id: int, destination: Destination, pending: list[ResultFile]) -> list[ResultFile]:
        """``pending`` less the instances that a crash left sent but unconfirmed and that the
        destination says it holds: those are confirmed now, with a history line each.

        A destination that cannot answer the query gets the instances again (at-least-once),
        noted once in the job's history.
        """
        in_doubt = self.store.in_doubt(job_id, destination.key)
        asked = [result for result in pending if result.sop_uid in in_doubt]
        if not asked or not destination.query_before_resend:
            return pending
        found, unanswered = find_stored(destination, asked, self.config.ae_title)
        for result in asked:
            if result.sop_uid in found:
                self.store.record_delivery(job_id, destination.key, result.sop_uid,
                                           note=f"{result.sop_uid} found at {destination.key}, not re-sent")
        if unanswered is not None:
            note = f"{destination.key} cannot say which results it holds ({unanswered}); unconfirmed ones are re-sent"
            if note not in self.store.history(job_id):
                self.store.note(job_id, note)
            logger.warning("job %d: %s", job_id, note)
        logger.info("job %d: %d of %d unconfirmed instance(s) found at %s", job_id, len(found), len(asked),
                    destination.key)
        return [result for result in pending if result.sop_uid not in found]
