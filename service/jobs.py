"""The durable job store: studies, jobs and per-instance deliveries in SQLite.

States of a job::

    received -> stable -> running -> delivering -> delivered
      ^  |        ^          |            |
      |  |        |          v            v (destination down: stays delivering, retried)
      |  |        +------ failed -----> dead (after max_attempts; reason kept)
      |  +-> held -----> stable (operator release)
      |  +-> skipped
      +----- held, skipped (a new instance re-opens them)

    received, stable, held, failed -> cancelled (operator; never run, never re-opened)

* ``received``: instances are arriving; the study becomes ``stable`` after its
  inactivity timeout.
* ``held``: instances of the study were refused for lack of resources (0xA7xx) and
  have not been re-sent; it waits for them, or for an operator's release.
* ``skipped``: no series of the study matches the series-selection rules; closed
  without running the application.
* ``cancelled``: an operator cancelled it before it ran (or between failed attempts); the
  scheduler never picks it up and new instances of the study open a new job (late-instance
  policy permitting). An operator retry queues it again.
* ``running``: the application runs; a job found ``running`` at start-up (the node was
  killed) goes back to ``stable`` (or ``dead`` when it has used all its attempts).
* ``delivering``: results exist; every (destination, SOP Instance UID) pair is recorded
  in ``deliveries`` as ``sending`` before it leaves and as ``delivered`` as soon as the
  peer confirms it, so a restart never sends a confirmed one again and knows which ones
  may have reached the peer unconfirmed (the worker asks the peer about those).
  Storage Commitment requests and the peer's reports on them are kept in ``commitments``.

The database runs in WAL mode with one connection per thread.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from msk_node_service.spool import DIR_MODE, FILE_MODE

logger = logging.getLogger(__name__)

STATES = ("received", "stable", "held", "skipped", "running", "delivering", "delivered", "failed", "dead",
          "cancelled")
#: Job states an operator may retry (``msk-node retry``, the dashboard's requeue).
RETRYABLE_STATES = ("dead", "failed", "skipped", "cancelled", "delivered", "delivering")
#: Job states an operator may cancel.
CANCELLABLE_STATES = ("received", "stable", "held", "failed")
#: Job states in which a new instance is part of the pending run (the job has not run yet, or runs again).
OPEN_STATES = ("received", "stable", "failed")
#: Job states that end a run: nothing more happens to the job unless the study grows or an operator acts.
FINISHED_STATES = ("delivered", "dead", "skipped", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(uid),
    received REAL NOT NULL,
    times_received INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL REFERENCES studies(uid),
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivery_tries INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    reason TEXT NOT NULL DEFAULT '',
    output_dir TEXT,
    input_instances INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS job_history (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_history_by_job ON job_history(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_uid)
);
CREATE TABLE IF NOT EXISTS refusals (
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    cause TEXT NOT NULL,
    at REAL NOT NULL,
    released REAL,
    PRIMARY KEY (study_uid, sop_uid)
);
CREATE TABLE IF NOT EXISTS node_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ae_title TEXT NOT NULL,
    started REAL NOT NULL,
    stopped REAL
);
CREATE TABLE IF NOT EXISTS association_counts (
    run_id INTEGER NOT NULL REFERENCES node_runs(id),
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, outcome, detail)
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (transaction_uid, sop_uid)
);
"""

#: Why instances were refused (``refusals.cause``), as the held job's reason says it.
REFUSAL_CAUSES = {"space": "for lack of space", "disk": "for a disk write failure",
                  "database": "for a database failure"}


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table."""

    id: int
    study_uid: str
    state: str
    attempts: int
    delivery_tries: int
    next_attempt: float | None
    reason: str
    output_dir: str | None
    input_instances: int | None
    created: float
    updated: float
    started: float | None
    finished: float | None


@dataclass(frozen=True)
class Received:
    """What recording one instance did.

    Attributes
    ----------
    duplicate : bool
        The SOP Instance UID was already stored (the file was replaced).
    job_id : int or None
        The job the instance belongs to; ``None`` when it was ignored by the
        late-instance policy.
    opened : bool
        A new job was created for it.
    """

    duplicate: bool
    job_id: int | None
    opened: bool


class JobStore:
    """SQLite store shared by the listener threads, the scheduler and the CLI.

    Parameters
    ----------
    path : pathlib.Path
        Database file (created with its schema if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        #: Refusals the database could not take (a full disk fails its writes too); recorded before
        #: any study is judged stable.
        self._unrecorded_refusals: list[tuple[str, str, str, float]] = []
        self._connection().executescript(_SCHEMA)

    # -- connections ---------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
            with self._lock:
                for ident, (thread, old) in list(self._connections.items()):
                    if not thread.is_alive():  # association threads come and go
                        old.close()
                        del self._connections[ident]
                self._connections[threading.get_ident()] = (threading.current_thread(), connection)
        return connection

    class _Transaction:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self.connection = connection

        def __enter__(self) -> sqlite3.Connection:
            self.connection.execute("BEGIN IMMEDIATE")
            return self.connection

        def __exit__(self, kind, value, traceback) -> None:
            self.connection.execute("COMMIT" if kind is None else "ROLLBACK")

    def _transaction(self) -> JobStore._Transaction:
        return JobStore._Transaction(self._connection())

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            for _, connection in self._connections.values():
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    # -- ingest --------------------------------------------------------------------

    def record_instance(self, study_uid: str, sop_uid: str, calling_ae: str, late_instance_policy: str,
                        now: float | None = None) -> Received:
        """Record a stored instance and open, re-open or extend its study's job.

        Parameters
        ----------
        study_uid, sop_uid : str
            UIDs of the instance (already on disk).
        calling_ae : str
            AE title of the sender; selects the study's inactivity timeout.
        late_instance_policy : str
            ``"reprocess"``: a new instance for a study whose last job already ran
            (running, delivering, delivered or dead) opens a new job; ``"ignore"``: it
            does not. A re-sent instance the study already has never opens a job.
        now : float, optional
            Time stamp (``time.time()``).

        Returns
        -------
        Received
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            known = db.execute("SELECT study_uid FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
            duplicate = known is not None
            db.execute(
                "INSERT INTO studies (uid, calling_ae, first_received, last_received) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(uid) DO UPDATE SET calling_ae = excluded.calling_ae, last_received = excluded.last_received",
                (study_uid, calling_ae, now, now))
            if duplicate:
                db.execute("UPDATE instances SET received = ?, times_received = times_received + 1, study_uid = ? "
                           "WHERE sop_uid = ?", (now, study_uid, sop_uid))
            else:
                db.execute("INSERT INTO instances (sop_uid, study_uid, received) VALUES (?, ?, ?)",
                           (sop_uid, study_uid, now))
            db.execute("UPDATE studies SET instance_count = (SELECT COUNT(*) FROM instances WHERE study_uid = ?) "
                       "WHERE uid = ?", (study_uid, study_uid))
            latest = db.execute("SELECT id, state FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
                                (study_uid,)).fetchone()
            if latest is None:
                return Received(duplicate, self._insert_job(db, study_uid, now), True)
            job_id, state = int(latest["id"]), latest["state"]
            if state == "stable":  # still arriving: wait for the study to settle again
                self._set(db, job_id, now, state="received")
                return Received(duplicate, job_id, False)
            if state == "held" or (state == "skipped" and not duplicate):
                # The sender is back (re-sending what was refused) or the study grew: judge it again when it settles.
                self._set(db, job_id, now, state="received", reason="", finished=None)
                self._note(db, job_id, now, f"re-opened: an instance arrived while it was {state}")
                return Received(duplicate, job_id, False)
            if state in OPEN_STATES:
                return Received(duplicate, job_id, False)
            if duplicate or late_instance_policy == "ignore":
                return Received(duplicate, None, False)
            return Received(duplicate, self._insert_job(db, study_uid, now), True)

    @staticmethod
    def _insert_job(db: sqlite3.Connection, study_uid: str, now: float) -> int:
        cursor = db.execute("INSERT INTO jobs (study_uid, state, created, updated) VALUES (?, 'received', ?, ?)",
                            (study_uid, now, now))
        return int(cursor.lastrowid)

    @staticmethod
    def _set(db: sqlite3.Connection, job_id: int, now: float, **values: object) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)
        db.execute(f"UPDATE jobs SET {columns}, updated = ? WHERE id = ?", (*values.values(), now, job_id))

    # -- scheduler -----------------------------------------------------------------

    def recover(self, max_attempts: int, now: float | None = None) -> list[int]:
        """After a restart: jobs left ``running`` go back to ``stable`` (or ``dead``).

        Parameters
        ----------
        max_attempts : int
            A job that was interrupted on its last allowed attempt becomes ``dead``.

        Returns
        -------
        list of int
            Ids of the recovered jobs.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    reason = f"interrupted by a node restart on attempt {row['attempts']} of {max_attempts}"
                    self._set(db, row["id"], now, state="dead", finished=now, reason=reason)
                else:
                    reason = "interrupted by a node restart; will run again"
                    self._set(db, row["id"], now, state="stable", next_attempt=None, reason=reason)
                self._note(db, row["id"], now, reason)
        return [int(row["id"]) for row in rows]

    def note(self, job_id: int, event: str, now: float | None = None) -> None:
        """Add one line to the job's history (what happened to it besides its state)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            self._note(db, job_id, now, event)

    @staticmethod
    def _note(db: sqlite3.Connection, job_id: int, now: float, event: str) -> None:
        db.execute("INSERT INTO job_history (job_id, at, event) VALUES (?, ?, ?)", (job_id, now, event))

    def history(self, job_id: int) -> list[str]:
        """The job's history lines, oldest first."""
        rows = self._connection().execute("SELECT event FROM job_history WHERE job_id = ? ORDER BY at, rowid",
                                          (job_id,)).fetchall()
        return [row["event"] for row in rows]

    def received_jobs(self) -> list[tuple[Job, str, float]]:
        """Jobs still receiving, with their study's calling AE and last receive time."""
        rows = self._connection().execute(
            "SELECT jobs.*, studies.calling_ae AS calling_ae, studies.last_received AS last_received "
            "FROM jobs JOIN studies ON studies.uid = jobs.study_uid WHERE jobs.state = 'received' ORDER BY jobs.id"
        ).fetchall()
        return [(_job(row), row["calling_ae"], float(row["last_received"])) for row in rows]

    def mark_stable(self, job_id: int, last_received: float, now: float | None = None) -> str | None:
        """``received`` -> ``stable``, or ``held`` while instances refused for lack of resources
        are missing; nothing (None) if an instance arrived after ``last_received``.

        Returns
        -------
        str or None
            The new state.
        """
        now = time.time() if now is None else now
        with self._transaction_with_refusals() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'stable', updated = ? WHERE id = ? AND state = 'received' AND "
                "(SELECT last_received FROM studies WHERE uid = jobs.study_uid) <= ?", (now, job_id, last_received))
            if cursor.rowcount != 1:
                return None
            study_uid = db.execute("SELECT study_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()["study_uid"]
            missing = self._missing_refused(db, study_uid)
            if not missing:
                return "stable"
            causes = [(REFUSAL_CAUSES.get(cause, cause), n) for cause, n in sorted(missing.items())]
            why = causes[0][0] if len(causes) == 1 else "(" + ", ".join(f"{n} {text}" for text, n in causes) + ")"
            reason = f"{sum(missing.values())} instance(s) refused {why}; held until the sender re-sends them " \
                     f"or an operator releases the job"
            self._set(db, job_id, now, state="held", reason=reason)
            self._note(db, job_id, now, f"held: {reason}")
            return "held"

    @staticmethod
    def _missing_refused(db: sqlite3.Connection, study_uid: str) -> dict[str, int]:
        """Instances of the study refused and not stored since, by cause (releases excluded)."""
        rows = db.execute(
            "SELECT cause, COUNT(*) AS n FROM refusals WHERE study_uid = ? AND released IS NULL AND sop_uid NOT IN "
            "(SELECT sop_uid FROM instances WHERE study_uid = ?) GROUP BY cause", (study_uid, study_uid)).fetchall()
        return {row["cause"]: int(row["n"]) for row in rows}

    def record_refusal(self, study_uid: str, sop_uid: str, cause: str, now: float | None = None) -> None:
        """Record an instance refused for lack of resources (``cause``: a key of :data:`REFUSAL_CAUSES`), so its
        study is held rather than processed without it.

        When the database cannot write it either, it is kept in memory and written by the next
        :meth:`record_refusal` or :meth:`mark_stable` of this store (which fail until it is).
        """
        now = time.time() if now is None else now
        try:
            with self._transaction_with_refusals(((study_uid, sop_uid, cause, now),)):
                pass
        except sqlite3.Error as error:
            logger.error("study %s: refusal of instance %s kept in memory until the database takes it: %s",
                         study_uid, sop_uid, error)

    @contextmanager
    def _transaction_with_refusals(self, new: tuple[tuple[str, str, str, float], ...] = ()
                                   ) -> Iterator[sqlite3.Connection]:
        """A transaction that first writes the refusals not yet recorded (and ``new``); they are kept
        for the next try if it fails."""
        with self._lock:
            rows, self._unrecorded_refusals = [*self._unrecorded_refusals, *new], []
        try:
            with self._transaction() as db:
                db.executemany(
                    "INSERT INTO refusals (study_uid, sop_uid, cause, at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(study_uid, sop_uid) DO UPDATE SET cause = excluded.cause, at = excluded.at, "
                    "released = NULL", rows)
                yield db
        except BaseException:
            with self._lock:
                self._unrecorded_refusals[:0] = rows
            raise

    def skip(self, job_id: int, reason: str, now: float | None = None) -> bool:
        """``stable`` -> ``skipped`` (nothing in the study to process); False if the job moved meanwhile."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cursor = db.execute("UPDATE jobs SET state = 'skipped', reason = ?, finished = ?, updated = ? "
                                "WHERE id = ? AND state = 'stable'", (reason, now, now, job_id))
            if cursor.rowcount != 1:
                return False
            self._note(db, job_id, now, f"skipped: {reason}")
            return True

    def next_due(self, now: float | None = None) -> Job | None:
        """The next job to work on: a due delivery first, then the oldest runnable job."""
        now = time.time() if now is None else now
        row = self._connection().execute(
            "SELECT * FROM jobs WHERE (state = 'delivering' AND COALESCE(next_attempt, 0) <= ?) "
            "OR state = 'stable' OR (state = 'failed' AND COALESCE(next_attempt, 0) <= ?) "
            "ORDER BY CASE state WHEN 'delivering' THEN 0 ELSE 1 END, id LIMIT 1", (now, now)).fetchone()
        return _job(row) if row is not None else None

    def start_attempt(self, job_id: int, output_dir: str, now: float | None = None) -> Job | None:
        """``stable``/``failed`` -> ``running``, counting the attempt; ``None`` if the job moved meanwhile."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ?, updated = ?, "
                "output_dir = ?, next_attempt = NULL WHERE id = ? AND state IN ('stable', 'failed')",
                (now, now, output_dir, job_id))
            if cursor.rowcount != 1:
                return None
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def set_input_instances(self, job_id: int, count: int) -> None:
        """Record how many instances the attempt's input snapshot holds."""
        with self._transaction() as db:
            self._set(db, job_id, time.time(), input_instances=count)

    def finish_attempt(self, job_id: int, ok: bool, reason: str, max_attempts: int, backoff_s: float,
                       now: float | None = None) -> str:
        """End a ``running`` attempt.

        Parameters
        ----------
        ok : bool
            The application succeeded: the job goes to ``delivering``.
        reason : str
            Why it failed (kept on the job and shown by ``status``).
        max_attempts : int
            A failed job with this many attempts becomes ``dead``.
        backoff_s : float
            Otherwise it is ``failed`` and runs again after this many seconds.

        Returns
        -------
        str
            The new state.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if ok:
                state, values = "delivering", {"reason": reason, "next_attempt": None, "delivery_tries": 0}
            elif row["attempts"] >= max_attempts:
                state, values = "dead", {"reason": reason, "finished": now, "next_attempt": None}
            else:
                state, values = "failed", {"reason": reason, "next_attempt": now + backoff_s}
            self._set(db, job_id, now, state=state, **values)
            return state

    def interrupt_attempt(self, job_id: int, now: float | None = None) -> None:
        """A graceful stop interrupted the run: back to ``stable``, the attempt not counted."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = 'stable', attempts = MAX(attempts - 1, 0), reason = ?, updated = ? "
                       "WHERE id = ? AND state = 'running'",
                       ("interrupted by a node stop; will run again", now, job_id))

    # -- deliveries ----------------------------------------------------------------

    def delivered(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of the job already confirmed by ``destination``."""
        rows = self._connection().execute(
            "SELECT sop_uid FROM deliveries WHERE job_id = ? AND destination = ? AND state = 'delivered'",
            (job_id, destination)).fetchall()
        return {row["sop_uid"] for row in rows}

    def in_doubt(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of the job sent to ``destination`` (or about to be) without a confirmation."""
        rows = self._connection().execute(
            "SELECT sop_uid FROM deliveries WHERE job_id = ? AND destination = ? AND state = 'sending'",
            (job_id, destination)).fetchall()
        return {row["sop_uid"] for row in rows}

    def record_sending(self, job_id: int, destination: str, sop_uids: Sequence[str], now: float | None = None) -> None:
        """Record that these instances are about to go to ``destination``, before they leave."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.executemany("INSERT INTO deliveries (job_id, destination, sop_uid, state, updated) "
                           "VALUES (?, ?, ?, 'sending', ?) ON CONFLICT(job_id, destination, sop_uid) "
                           "DO UPDATE SET updated = excluded.updated WHERE state = 'sending'",
                           [(job_id, destination, sop_uid, now) for sop_uid in sop_uids])

    def record_delivery(self, job_id: int, destination: str, sop_uid: str, note: str | None = None,
                        now: float | None = None) -> None:
        """Record that ``destination`` confirmed one result instance (never sent again), with an
        optional history line written in the same transaction."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("INSERT INTO deliveries (job_id, destination, sop_uid, state, updated) "
                       "VALUES (?, ?, ?, 'delivered', ?) ON CONFLICT(job_id, destination, sop_uid) "
                       "DO UPDATE SET state = 'delivered', updated = excluded.updated",
                       (job_id, destination, sop_uid, now))
            if note is not None:
                self._note(db, job_id, now, note)

    def record_commitment_request(self, job_id: int, destination: str, transaction_uid: str,
                                  sop_uids: Sequence[str], now: float | None = None) -> None:
        """Record a Storage Commitment request (state ``requested``), before it is sent."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.executemany("INSERT INTO commitments (transaction_uid, job_id, destination, sop_uid, state, updated) "
                           "VALUES (?, ?, ?, ?, 'requested', ?)",
                           [(transaction_uid, job_id, destination, sop_uid, now) for sop_uid in sop_uids])

    def record_commitment_report(self, transaction_uid: str, committed: Sequence[str], failed: Sequence[str],
                                 now: float | None = None) -> int | None:
        """Record a Storage Commitment report: instances ``committed`` or ``failed``, with a history line.

        Returns
        -------
        int or None
            The job the transaction belongs to; None for a transaction the node did not request.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT job_id, destination FROM commitments WHERE transaction_uid = ? LIMIT 1",
                             (transaction_uid,)).fetchone()
            if row is None:
                return None
            for state, sop_uids in (("committed", committed), ("failed", failed)):
                db.executemany("UPDATE commitments SET state = ?, updated = ? "
                               "WHERE transaction_uid = ? AND sop_uid = ?",
                               [(state, now, transaction_uid, sop_uid) for sop_uid in sop_uids])
            event = f"{len(committed)} instance(s) committed by {row['destination']} (transaction {transaction_uid})"
            if failed:
                event += f"; {len(failed)} not committed: {', '.join(list(failed)[:3])}"
            self._note(db, row["job_id"], now, event)
            return int(row["job_id"])

    def commitments(self, job_id: int, destination: str) -> dict[str, str]:
        """SOP Instance UID -> commitment state (requested, committed, failed) of the job at ``destination``."""
        rows = self._connection().execute(
            "SELECT sop_uid, state FROM commitments WHERE job_id = ? AND destination = ? ORDER BY updated",
            (job_id, destination)).fetchall()
        return {row["sop_uid"]: row["state"] for row in rows}

    def finish_delivery(self, job_id: int, complete: bool, reason: str, backoff_s: float,
                        now: float | None = None) -> str:
        """All results confirmed (``delivered``), or try the missing ones again after ``backoff_s``."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            if complete:
                self._set(db, job_id, now, state="delivered", reason=reason, finished=now, next_attempt=None)
                return "delivered"
            db.execute("UPDATE jobs SET delivery_tries = delivery_tries + 1, reason = ?, next_attempt = ?, "
                       "updated = ? WHERE id = ? AND state = 'delivering'", (reason, now + backoff_s, now, job_id))
            return "delivering"

    # -- operators -----------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        """One job by id."""
        row = self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        """All jobs (of one study), oldest first."""
        if study_uid is None:
            rows = self._connection().execute("SELECT * FROM jobs ORDER BY id").fetchall()
        else:
            rows = self._connection().execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id",
                                              (study_uid,)).fetchall()
        return [_job(row) for row in rows]

    def status_rows(self) -> list[dict]:
        """Jobs joined with their study, delivery counts and history, for ``msk-node status``."""
        connection = self._connection()
        rows = connection.execute(
            "SELECT jobs.*, studies.calling_ae AS calling_ae, studies.instance_count AS instances, "
            "(SELECT COUNT(*) FROM deliveries WHERE deliveries.job_id = jobs.id AND deliveries.state = 'delivered') "
            "AS deliveries FROM jobs JOIN studies ON studies.uid = jobs.study_uid ORDER BY jobs.id").fetchall()
        history: dict[int, list[str]] = {}
        for row in connection.execute("SELECT job_id, event FROM job_history ORDER BY at, rowid"):
            history.setdefault(row["job_id"], []).append(row["event"])
        return [{**dict(row), "history": history.get(row["id"], [])} for row in rows]

    def study(self, study_uid: str) -> dict | None:
        """The study row as a dict."""
        row = self._connection().execute("SELECT * FROM studies WHERE uid = ?", (study_uid,)).fetchone()
        return dict(row) if row is not None else None

    def requeue(self, job_id: int, now: float | None = None) -> str:
        """Operator retry: a ``dead``, ``failed``, ``skipped`` or ``cancelled`` job runs again with a
        fresh attempt count (a skipped one without looking at its series again); a ``delivered`` job
        runs again with its attempt count going on (new results, delivered again); a ``delivering``
        job tries its destinations now.

        Returns
        -------
        str
            The job's new state.

        Raises
        ------
        KeyError
            If there is no job ``job_id``.
        ValueError
            If the job is in a state that cannot be retried (received, stable, held, running).
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            state = row["state"]
            if state in ("dead", "failed", "skipped", "cancelled", "delivered"):
                fresh = {} if state == "delivered" else {"attempts": 0}
                reason = f"requeued by the operator (was {state})"
                self._set(db, job_id, now, state="stable", next_attempt=None, finished=None, reason=reason, **fresh)
                self._note(db, job_id, now, reason)
                return "stable"
            if state == "delivering":
                self._set(db, job_id, now, next_attempt=None)
                return "delivering"
            raise ValueError(f"job {job_id} is {state}; only {', '.join(RETRYABLE_STATES)} jobs can be retried")

    def cancel(self, job_id: int, now: float | None = None) -> None:
        """Operator cancel: a job that is not running or delivering (see :data:`CANCELLABLE_STATES`)
        becomes ``cancelled`` and is never run.

        Raises
        ------
        KeyError
            If there is no job ``job_id``.
        ValueError
            If the job is in another state.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            if row["state"] not in CANCELLABLE_STATES:
                raise ValueError(f"job {job_id} is {row['state']}; only {', '.join(CANCELLABLE_STATES)} jobs "
                                 f"can be cancelled")
            reason = f"cancelled by the operator (was {row['state']})"
            self._set(db, job_id, now, state="cancelled", next_attempt=None, finished=now, reason=reason)
            self._note(db, job_id, now, reason)

    def release(self, job_id: int, now: float | None = None) -> int:
        """Operator release: a ``held`` job runs without the instances that were refused.

        Returns
        -------
        int
            How many refused instances it runs without.

        Raises
        ------
        KeyError
            If there is no job ``job_id``.
        ValueError
            If the job is not ``held``.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT state, study_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            if row["state"] != "held":
                raise ValueError(f"job {job_id} is {row['state']}; only held jobs can be released")
            missing = sum(self._missing_refused(db, row["study_uid"]).values())
            # Released refusals no longer hold the study, should it grow again.
            db.execute("UPDATE refusals SET released = ? WHERE study_uid = ? AND released IS NULL",
                       (now, row["study_uid"]))
            reason = f"released by the operator with {missing} refused instance(s) missing"
            self._set(db, job_id, now, state="stable", next_attempt=None, reason=reason)
            self._note(db, job_id, now, reason)
            return missing

    # -- association health --------------------------------------------------------

    def begin_run(self, ae_title: str, now: float | None = None) -> int:
        """A node started: association counts from now on belong to the returned run id."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return int(db.execute("INSERT INTO node_runs (ae_title, started) VALUES (?, ?)",
                                  (ae_title, now)).lastrowid)

    def end_run(self, run_id: int, now: float | None = None) -> None:
        """The node of ``run_id`` stopped."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE node_runs SET stopped = ? WHERE id = ?", (now, run_id))

    def count_association(self, run_id: int, outcome: str, detail: str = "") -> None:
        """One more association (or connection) of the run that ended in ``outcome`` (and ``detail``)."""
        with self._transaction() as db:
            db.execute("INSERT INTO association_counts (run_id, outcome, detail, count) VALUES (?, ?, ?, 1) "
                       "ON CONFLICT(run_id, outcome, detail) DO UPDATE SET count = count + 1",
                       (run_id, outcome, detail))

    def association_health(self) -> dict | None:
        """Association counts of the latest node run: ``{"ae_title", "started", "stopped", "counts":
        {outcome: {detail: count}}}``; None before any node ran on this store."""
        connection = self._connection()
        run = connection.execute("SELECT * FROM node_runs ORDER BY id DESC LIMIT 1").fetchone()
        if run is None:
            return None
        counts: dict[str, dict[str, int]] = {}
        for row in connection.execute("SELECT outcome, detail, count FROM association_counts WHERE run_id = ? "
                                      "ORDER BY outcome, detail", (run["id"],)):
            counts.setdefault(row["outcome"], {})[row["detail"]] = int(row["count"])
        return {"ae_title": run["ae_title"], "started": run["started"], "stopped": run["stopped"], "counts": counts}


def _job(row: sqlite3.Row) -> Job:
    return Job(**{name: row[name] for name in Job.__dataclass_fields__})
