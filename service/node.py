"""The node: listener + scheduler (+ dashboard) over one spool and one job store; status, retry, release, cancel."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from pynetdicom.transport import ThreadedAssociationServer

from msk_node_service.app_worker import AppPidFile
from msk_node_service.config import NodeConfig
from msk_node_service.jobs import JobStore
from msk_node_service.listener import start_listener, stop_listener
from msk_node_service.spool import Spool
from msk_node_service.worker import APP_PID_FILE, Worker

if TYPE_CHECKING:
    from msk_node_service.dashboard import DashboardServer

logger = logging.getLogger(__name__)
#: What an operator command on a job returns.
T = TypeVar("T")


class Node:
    """The PACS node service.

    Parameters
    ----------
    config : NodeConfig

    Note
    ----
    Start-up recovers from a crash first: an application process the crashed node left
    running is ended (with its process group; found by the pid file in the spool,
    checked against its start time so a reused pid is never killed) and noted in its
    job's history, partial spool writes are removed and jobs left ``running`` go back
    to ``stable`` (see :meth:`JobStore.recover`). Only one node may use a spool at a
    time.
    """

    def __init__(self, config: NodeConfig) -> None:
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config must be a NodeConfig, got {type(config).__name__}")
        self.config = config
        self.spool: Spool | None = None
        self.store: JobStore | None = None
        self.worker: Worker | None = None
        self.server: ThreadedAssociationServer | None = None
        self.dashboard: DashboardServer | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        """The port the listener is bound to (the real one when the config says 0)."""
        if self.server is None:
            raise RuntimeError("the node is not started")
        return int(self.server.server_address[1])

    def start(self) -> Node:
        """Recover, then start the listener, the scheduler and (when enabled) the dashboard; returns ``self``."""
        if self.server is not None:
            raise RuntimeError("the node is already started")
        self._stopped.clear()
        dashboard = None
        if self.config.dashboard.enabled:  # built first: a dashboard it refuses to serve stops the start
            from msk_node_service.dashboard import DashboardServer

            dashboard = DashboardServer(self)
        self.spool = Spool(self.config.spool_dir)
        removed = self.spool.clean_tmp()
        self.store = JobStore(self.config.database)
        self._end_leftover_app()
        recovered = self.store.recover(self.config.max_attempts)
        if removed or recovered:
            logger.info("recovered: %d partial write(s) removed, job(s) %s interrupted", removed,
                        ", ".join(map(str, recovered)) or "none")
        self.worker = Worker(self.config, self.spool, self.store)
        try:
            self.server = start_listener(self.config, self.spool, self.store)
        except BaseException:
            self.store.close()
            raise
        self.worker.start()
        if dashboard is not None:
            self.dashboard = dashboard
            try:
                dashboard.start()
            except BaseException:
                self.stop()
                raise
        return self

    def ready(self) -> dict[str, bool]:
        """What ``/readyz`` checks: the listener is bound, the job store open, the scheduler alive."""
        return {"listener": self.server is not None, "job_store": self.store is not None,
                "worker": self.worker is not None and self.worker.alive}

    def _end_leftover_app(self) -> None:
        """End the application a crashed node left running, before its study runs again."""
        assert self.spool is not None and self.store is not None
        ended = AppPidFile(self.spool.root / APP_PID_FILE).end_leftover()
        if ended is None:
            return
        job_id = ended.get("job")
        event = f"application process {ended['pid']} left running by the previous node was ended"
        logger.warning("%s%s", event, f" (job {job_id})" if job_id is not None else " (no job)")
        if isinstance(job_id, int) and self.store.job(job_id) is not None:
            self.store.note(job_id, event)

    def stop(self) -> None:
        """Stop accepting associations, stop the scheduler (a running job goes back to
        ``stable``), the dashboard, and close the store. Safe to call twice."""
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        if self.server is not None:
            stop_listener(self.server)
            self.server = None
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._stopped.set()
        logger.info("node %s stopped", self.config.ae_title)

    def run_forever(self) -> None:
        """Start and serve until SIGINT or SIGTERM (main thread only), then stop."""
        self.start()
        previous = {}

        def request_stop(signum, frame) -> None:
            logger.info("signal %d: stopping", signum)
            self._stopped.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        try:
            while not self._stopped.wait(1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def status(config: NodeConfig) -> list[dict]:
    """Every job with its study, state, attempts, reason and delivered-instance count.

    Reads the job store without a running node (safe while one runs).

    Returns
    -------
    list of dict
        Keys: ``id``, ``study_uid``, ``state``, ``attempts``, ``reason``, ``calling_ae``,
        ``instances``, ``input_instances``, ``deliveries``, ``next_attempt``, ``created``,
        ``updated``, ``started``, ``finished``, ``output_dir``, ``delivery_tries``, ``history``
        (list of str: what happened to the job besides its state, e.g. a node restart).
    """
    with _existing_job_store(config) as store:
        return store.status_rows() if store is not None else []


def association_health(config: NodeConfig) -> dict | None:
    """How the associations of the latest node run ended, as the listener counted them.

    Returns
    -------
    dict or None
        ``ae_title``, ``started`` and ``stopped`` (epoch seconds; ``stopped`` is None while
        the node runs or when it was killed) and ``counts``: outcome (``accepted``,
        ``refused``, ``aborted``, ``dropped``) to detail (the refusal's reason, what was
        wrong with a dropped connection; ``""`` for none) to count. None before any node
        ran on this job store.
    """
    with _existing_job_store(config) as store:
        return store.association_health() if store is not None else None


def release(config: NodeConfig, job_id: int) -> int:
    """Run a held job without the instances that were refused for lack of resources.

    Returns
    -------
    int
        How many refused instances the job runs without.

    Raises
    ------
    KeyError
        If there is no such job.
    ValueError
        If the job is not held.
    """
    return _on_job(config, job_id, JobStore.release)


def retry(config: NodeConfig, job_id: int) -> str:
    """Requeue a dead, failed, skipped or cancelled job (fresh attempts) or a delivered one (it runs again),
    or deliver a ``delivering`` job now.

    Returns
    -------
    str
        The job's new state.

    Raises
    ------
    KeyError
        If there is no such job.
    ValueError
        If the job cannot be retried in its state.
    """
    return _on_job(config, job_id, JobStore.requeue)


def cancel(config: NodeConfig, job_id: int) -> str:
    """Cancel a received, stable, held or failed job: it goes to ``cancelled`` and never runs.

    Returns
    -------
    str
        ``"cancelled"``.

    Raises
    ------
    KeyError
        If there is no such job.
    ValueError
        If the job cannot be cancelled in its state.
    """
    _on_job(config, job_id, JobStore.cancel)
    return "cancelled"


@contextmanager
def _existing_job_store(config: NodeConfig) -> Iterator[JobStore | None]:
    """The node's job store, closed on leaving; None when no node has made one yet (none is created here)."""
    if not config.database.exists():
        yield None
        return
    store = JobStore(config.database)
    try:
        yield store
    finally:
        store.close()


def _on_job(config: NodeConfig, job_id: int, operation: Callable[[JobStore, int], T]) -> T:
    """An operator's ``operation`` on job ``job_id``; KeyError when there is no job store, hence no job."""
    with _existing_job_store(config) as store:
        if store is None:
            raise KeyError(f"no job {job_id} (no job store at {config.database})")
        return operation(store, int(job_id))
