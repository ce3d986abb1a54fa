"""The DICOM listener: C-ECHO and C-STORE SCP writing to the spool.

The C-STORE handler answers ``0x0000`` only after the instance is on disk (fsynced and
renamed into its study folder) and recorded in the job store; ``0xA700`` (out of
resources) when the disk or the database fails, ``0xC210`` (cannot understand) when the
dataset cannot be decoded or lacks valid Study/SOP Instance UIDs. An instance refused with
``0xA700`` is recorded, so its study is held rather than processed without it.

How each association or connection ends (accepted, refused and why, aborted, dropped) is
counted in the job store for ``msk-node status``.

Logs at INFO name AE titles, UIDs and counts, never patient attributes.

Connections are guarded so that broken or hostile peers cannot lock real senders out:
pynetdicom counts a connection against ``max_associations`` until its thread ends, and
that thread waits the whole ACSE timeout for an association request even after the
peer has closed the connection, so a connection closed early (port scan, health check,
garbage) ends its thread at once. Silent connections are closed by the ARTIM timer,
socket reads and writes are bounded by the network timeout, and one peer address gets
at most ``max_associations_per_address`` associations. What pynetdicom logs about
malformed PDUs (an error per PDU, some with a traceback) becomes one rate-limited
WARNING per connection; the details and tracebacks are logged at DEBUG.
"""
from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import ssl
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence

from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer

from msk_node_service.config import NodeConfig, TlsConfig
from msk_node_service.delivery import handle_commitment_report
from msk_node_service.jobs import JobStore
from msk_node_service.spool import Spool, is_valid_uid

logger = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class; the sender's order of
#: preference decides, and the instance is stored in the one accepted.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

#: errno values of a full disk or an exhausted quota.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: What goes wrong when a received byte stream is not a decodable dataset.
_DECODE_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, struct.error,
                  NotImplementedError)


class _AssociationTally:
    """Per-association counts, logged once when the association ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, Counter] = {}

    def add(self, assoc: object, outcome: str, study_uid: str | None = None) -> None:
        with self._lock:
            counts = self._counts.setdefault(id(assoc), Counter())
            counts[outcome] += 1
            if study_uid:
                counts[f"study:{study_uid}"] = 1

    def pop(self, assoc: object) -> Counter:
        with self._lock:
            return self._counts.pop(id(assoc), Counter())


class _Health:
    """Counts how associations and connections end, in the job store's current node run, where
    ``msk-node status`` reads them; a count the database does not take is lost, never an error."""

    def __init__(self, store: JobStore, ae_title: str) -> None:
        self.store = store
        self.run_id = store.begin_run(ae_title)

    def count(self, outcome: str, detail: str = "") -> None:
        try:
            self.store.count_association(self.run_id, outcome, detail)
        except sqlite3.Error as error:
            logger.debug("association %s (%s) not counted: %s", outcome, detail, error)

    def on_accepted(self, event: evt.Event) -> None:
        self.count("accepted")

    def on_aborted(self, event: evt.Event) -> None:
        self.count("aborted")


def handle_store(event: evt.Event, spool: Spool, store: JobStore, config: NodeConfig,
                 tally: _AssociationTally) -> int:
    """EVT_C_STORE handler: spool, record, then answer.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request.
    spool : Spool
        Where the instance is written.
    store : JobStore
        Where it is recorded (opens or extends its study's job).
    config : NodeConfig
        Supplies the late-instance policy.
    tally : _AssociationTally
        Per-association counters for the summary log line.

    Returns
    -------
    int
        ``0x0000`` once stored and recorded, ``0xC210`` for an undecodable dataset or
        invalid UIDs, ``0xA700`` for a disk or database failure.
    """
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
    except _DECODE_ERRORS as error:
        logger.warning("C-STORE from %s refused: dataset cannot be decoded (%s)", calling_ae, type(error).__name__)
        tally.add(event.assoc, "refused")
        return CANNOT_UNDERSTAND
    if not is_valid_uid(study_uid) or not is_valid_uid(sop_uid):
        logger.warning("C-STORE from %s refused: invalid StudyInstanceUID %r or SOPInstanceUID %r",
                       calling_ae, study_uid, sop_uid)
        tally.add(event.assoc, "refused")
        return CANNOT_UNDERSTAND
    try:
        spool.write_instance(ds)
    except OSError as error:
        logger.error("C-STORE from %s: study %s instance %s not stored: %s", calling_ae, study_uid, sop_uid, error)
        tally.add(event.assoc, "failed")
        store.record_refusal(study_uid, sop_uid, "space" if error.errno in _NO_SPACE else "disk")
        return OUT_OF_RESOURCES
    except _DECODE_ERRORS as error:
        logger.warning("C-STORE from %s: study %s instance %s cannot be written as a DICOM file (%s)",
                       calling_ae, study_uid, sop_uid, type(error).__name__)
        tally.add(event.assoc, "refused")
        return CANNOT_UNDERSTAND
    try:
        received = store.record_instance(study_uid, sop_uid, calling_ae, config.late_instance_policy)
    except sqlite3.Error as error:
        logger.error("C-STORE from %s: study %s instance %s not recorded: %s", calling_ae, study_uid, sop_uid, error)
        tally.add(event.assoc, "failed")
        store.record_refusal(study_uid, sop_uid, "database")
        return OUT_OF_RESOURCES
    tally.add(event.assoc, "duplicate" if received.duplicate else "stored", study_uid)
    if received.opened:
        logger.info("study %s from %s: job %d opened", study_uid, calling_ae, received.job_id)
    elif received.job_id is None and not received.duplicate:
        logger.info("study %s from %s: late instance %s ignored (late_instance_policy=ignore)",
                    study_uid, calling_ae, sop_uid)
    logger.debug("stored study=%s sop=%s from=%s duplicate=%s", study_uid, sop_uid, calling_ae, received.duplicate)
    return SUCCESS


def _handle_end(event: evt.Event, tally: _AssociationTally) -> None:
    counts = tally.pop(event.assoc)
    studies = sum(1 for key in counts if key.startswith("study:"))
    logger.info("association from %s %s: %d stored, %d re-sent, %d refused, %d failed, %d studies",
                str(event.assoc.requestor.ae_title).strip(), event.event.name.removeprefix("EVT_").lower(),
                counts["stored"], counts["duplicate"], counts["refused"], counts["failed"], studies)


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Server-side TLS context; client certificates are required when a CA is given."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


#: A-ASSOCIATE-RJ (result, source, diagnostic) -> why, for the audit line, and its count in the node's health.
_REJECT_REASONS = {
    (0x01, 0x01, 0x03): ("calling AE title not allowed", "calling AE unknown"),
    (0x01, 0x01, 0x07): ("called AE title is not ours", "called AE wrong"),
    (0x02, 0x03, 0x02): ("max_associations reached", "node limit"),
}
#: Warnings about one peer address beyond this many a minute are counted, not logged.
_WARNINGS_PER_MINUTE = 5
#: ARTIM time of a connection from an address with max_associations_per_address others waiting.
_CROWDED_ARTIM_S = 1.0
#: Messages pynetdicom logs from an association's own thread about a slow peer.
_PEER_TIMEOUTS = ("Network timeout reached", "DIMSE timeout reached while waiting for message response")


class _PeerWarnings:
    """WARNING lines about peers, at most ``limit`` per address and kind per ``window_s``;
    the rest are counted and summed up in one line when the window has passed. Refused
    associations are a kind of their own, so junk from an address cannot hide them."""

    KINDS = {"connection": "warning(s) about connections", "refused": "refused association(s)"}

    def __init__(self, limit: int = _WARNINGS_PER_MINUTE, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list] = {}  # (address, kind) -> [window start, logged, suppressed]

    def warning(self, address: str, message: str, *args: object, kind: str = "connection") -> None:
        now = time.monotonic()
        with self._lock:
            self._flush(now)
            window = self._windows.setdefault((address, kind), [now, 0, 0])
            if window[1] >= self.limit:
                window[2] += 1
                return
            window[1] += 1
        logger.warning(message, *args)

    def flush(self) -> None:
        """Log every pending summary now (the listener stops)."""
        with self._lock:
            self._flush(None)

    def _flush(self, now: float | None) -> None:
        for (address, kind), (start, _, suppressed) in list(self._windows.items()):
            if now is not None and now - start < self.window_s:
                continue
            del self._windows[address, kind]
            if suppressed:
                logger.warning("%d more %s from %s in %.0f s not logged", suppressed, self.KINDS[kind], address,
                               (now if now is not None else time.monotonic()) - start)


class _ProtocolErrors(logging.Filter):
    """Collects what pynetdicom logs at WARNING and above about a peer of one of our
    listeners (malformed PDUs, broken connections, timeouts) instead of letting it
    through; the listener logs one line per connection when it closes."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._problems: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._previous_excepthook = None

    def install(self) -> None:
        """Filter pynetdicom's loggers and catch exceptions that end a connection's
        reader thread (pynetdicom raises out of it on some PDU sequences); idempotent."""
        with self._lock:
            names = [name for name in logging.Logger.manager.loggerDict if name.startswith("pynetdicom.")]
            for name in names:
                # Handler errors stay visible: those are the node's bugs, not the peer's.
                if name != "pynetdicom.events" and self not in logging.getLogger(name).filters:
                    logging.getLogger(name).addFilter(self)
            if self._previous_excepthook is None:
                self._previous_excepthook = threading.excepthook
                threading.excepthook = self._excepthook

    def _excepthook(self, args) -> None:
        thread = args.thread
        assoc = thread.assoc if isinstance(thread, DULServiceProvider) else thread
        assoc = assoc if isinstance(assoc, Association) else None
        guard = _guard_of(assoc) if assoc is not None and assoc.is_acceptor else None
        if guard is None or args.exc_type is None or not issubclass(args.exc_type, Exception):
            self._previous_excepthook(args)
            return
        logger.debug("connection from %s: %s ended", _peer(assoc), thread.name,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        problems = [*self.pop(assoc), (str(args.exc_value), args.exc_type.__name__)]
        guard.report(assoc, problems)

    def pop(self, assoc: Association) -> list[tuple[str, str | None]]:
        """What was logged about the connection: ``(message, exception type or None)``."""
        with self._lock:
            return self._problems.pop(assoc, [])

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        thread = threading.current_thread()
        if isinstance(thread, DULServiceProvider):
            assoc = thread.assoc
        elif isinstance(thread, Association) and record.getMessage() in _PEER_TIMEOUTS:
            assoc = thread
        else:
            return True
        if not assoc.is_acceptor or _guard_of(assoc) is None:
            return True
        message = record.getMessage()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connection from %s: %s: %s", _peer(assoc), record.name, message, exc_info=record.exc_info)
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] is not None else None
        with self._lock:
            self._problems.setdefault(assoc, []).append((message, error))
        return False


_PROTOCOL_ERRORS = _ProtocolErrors()


def _guard_of(assoc: Association) -> _Guard | None:
    return getattr(getattr(assoc, "_server", None), "msk_guard", None)


def _peer(assoc: Association) -> str:
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except (ValueError, AttributeError):
        return "?"


def _acceptors(assoc: Association) -> list[Association]:
    """The listener's running associations (connections not yet associated included)."""
    return [a for a in assoc.ae.active_associations if a.is_acceptor and a.requestor.address_info is not None]


def _waiting_for_request(assoc: Association) -> bool:
    return assoc.requestor.primitive is None and not (assoc.is_established or assoc.is_rejected or assoc.is_aborted)


class _Guard:
    """Event handlers that keep the listener's slots for peers that associate."""

    def __init__(self, config: NodeConfig, health: _Health) -> None:
        self.config = config
        self.health = health
        self.warnings = _PeerWarnings()
        self._refused_here: weakref.WeakSet = weakref.WeakSet()

    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_CONN_CLOSE, self.on_close),
        ]

    def report(self, assoc: Association, problems: list[tuple[str, str | None]]) -> None:
        """The one WARNING line about a connection that broke the protocol: pynetdicom's
        first description of what went wrong, with the exception behind it."""
        described: list[str] = []  # pynetdicom logs an exception after the line that says what it was doing
        for index, (message, error) in enumerate(problems):
            if error is None:
                described.append(message)
            elif index and problems[index - 1][1] is None:
                described[-1] += f" ({error}: {message})"
        what = described[0] if described else f"{problems[0][1]}: {problems[0][0]}"
        if len(described) > 1:
            what += f" and {len(described) - 1} more protocol error(s)"
        self.warnings.warning(assoc.requestor.address, "connection from %s dropped: %s", _peer(assoc), what)
        self.health.count("dropped", "protocol error")

    def on_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        # pynetdicom's PDU and DIMSE dumps log only at DEBUG, and raise on some malformed PDUs.
        for dump in (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT):
            for handler, _ in list(assoc.get_handlers(dump)):
                if handler.__module__ == "pynetdicom._handlers":
                    assoc.unbind(dump, handler)
        assoc.dul.artim_timer.timeout = self.config.artim_timeout_s
        sock = assoc.dul.socket.socket
        # Bounds a read stuck inside a PDU (a header claiming 4 GB, then silence): the
        # ARTIM and network timers are checked only between reads.
        sock.settimeout(self.config.network_timeout_s)
        address = assoc.requestor.address
        waiting = [a for a in _acceptors(assoc) if a is not assoc and a.requestor.address == address
                   and _waiting_for_request(a)]
        if len(waiting) >= self.config.max_associations_per_address:
            # Silent connections from one address must not hold every slot for the ARTIM
            # time; a peer that means to associate sends its request at once (and is
            # rejected if its address is still over the limit then).
            assoc.dul.artim_timer.timeout = min(_CROWDED_ARTIM_S, self.config.artim_timeout_s)

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        same = [a for a in _acceptors(assoc) if a.requestor.address == address]
        if len(same) <= self.config.max_associations_per_address:
            return
        # As pynetdicom rejects over max_associations: transient, local limit exceeded.
        self._refused_here.add(assoc)
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        request, answer = assoc.requestor.primitive, assoc.acceptor.primitive
        code = (answer.result, answer.result_source, answer.diagnostic) if answer is not None else None
        if assoc in self._refused_here:
            limit = self.config.max_associations_per_address
            reason, kind = f"more than max_associations_per_address={limit} from this address", "per-address limit"
        elif code == (0x02, 0x03, 0x02):
            reason, kind = f"max_associations={self.config.max_associations} reached", "node limit"
        else:
            reason, kind = _REJECT_REASONS.get(code, (f"result {code}", f"other ({code})"))
        self.warnings.warning(assoc.requestor.address, "association refused (%s): calling AE %r, called AE %r, from %s",
                              reason, str(getattr(request, "calling_ae_title", "")).strip(),
                              str(getattr(request, "called_ae_title", "")).strip(), _peer(assoc), kind="refused")
        self.health.count("refused", kind)

    def on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        waiting = _waiting_for_request(assoc)
        problems = _PROTOCOL_ERRORS.pop(assoc)
        if problems:
            self.report(assoc, problems)
        elif waiting and assoc.dul.artim_timer.expired:
            self.warnings.warning(assoc.requestor.address, "connection from %s closed: no association request "
                                  "within %g s", _peer(assoc), assoc.dul.artim_timer.timeout)
            self.health.count("dropped", "no association request")
        elif waiting:
            logger.debug("connection from %s closed before an association request", _peer(assoc))
            self.health.count("dropped", "closed before a request")
        if waiting and assoc.dul.to_user_queue.empty():
            # The association thread waits acse_timeout_s for a request that will not come,
            # holding its slot; None is what it gets when that wait times out.
            assoc.dul.to_user_queue.put(None)


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the accept loop, where a
    peer that connects and never completes it would stop every other connection."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.settimeout(self.msk_guard.config.artim_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError as error:  # ssl.SSLError, a timeout, a reset
                self.msk_guard.warnings.warning(client_address[0], "TLS handshake with %s:%d failed: %s",
                                                client_address[0], client_address[1], error)
                self.msk_guard.health.count("dropped", "TLS handshake failed")
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def make_ae(config: NodeConfig, storage_transfer_syntaxes: Sequence[str] = STORAGE_TRANSFER_SYNTAXES) -> AE:
    """The node's application entity as SCP: Verification, every storage SOP class and
    Storage Commitment reports (N-EVENT-REPORT).

    Associations must call ``config.ae_title``; when ``allowed_calling_aes`` is not
    empty, only those calling AE titles are accepted (others are rejected at
    association, before any data is sent).
    """
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    ae.require_called_aet = True
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(storage_transfer_syntaxes))
    # Storage Commitment reports: the destination calls in as SCP of the Push Model.
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    return ae


def start_listener(config: NodeConfig, spool: Spool, store: JobStore) -> ThreadedAssociationServer:
    """Start the non-blocking listener.

    Parameters
    ----------
    config : NodeConfig
        AE title, address, allow-list, TLS.
    spool : Spool
    store : JobStore

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        The running server; ``server.server_address[1]`` is the bound port (useful
        with ``port: 0``); ``server.shutdown()`` stops it.
    """
    ae = make_ae(config)
    tally = _AssociationTally()
    guard = _Guard(config, _Health(store, config.ae_title))
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, store, config, tally]),
        (evt.EVT_N_EVENT_REPORT, handle_commitment_report, [store]),
        (evt.EVT_RELEASED, _handle_end, [tally]),
        (evt.EVT_ABORTED, _handle_end, [tally]),
        (evt.EVT_ACCEPTED, guard.health.on_accepted),
        (evt.EVT_ABORTED, guard.health.on_aborted),
        *guard.handlers(),
    ]
    ssl_context = tls_context(config.tls) if config.tls is not None else None
    # What ae.start_server(block=False) does, with the node's server class.
    server = ae.make_server((config.host, config.port), evt_handlers=handlers, ssl_context=ssl_context,
                            server_class=_Server)
    server.msk_guard = guard
    _PROTOCOL_ERRORS.install()
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{config.ae_title}", daemon=True).start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it
    logger.info("listening as %s on %s:%d (TLS %s, calling AEs %s)", config.ae_title, config.host,
                server.server_address[1], "on" if ssl_context else "off",
                ", ".join(config.allowed_calling_aes) or "any")
    return server


def stop_listener(server: ThreadedAssociationServer) -> None:
    """Stop accepting associations (running ones finish) and log pending warning summaries."""
    server.shutdown()
    guard = getattr(server, "msk_guard", None)
    if guard is not None:
        guard.warnings.flush()
        try:
            guard.health.store.end_run(guard.health.run_id)
        except sqlite3.Error as error:
            logger.warning("the end of this node run was not recorded: %s", error)
