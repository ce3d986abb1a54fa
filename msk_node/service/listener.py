"""The DICOM listener: C-ECHO and C-STORE SCP writing to the spool.

The C-STORE handler answers ``0x0000`` only after the instance is on disk (fsynced and
renamed into its study folder) and recorded in the job store; ``0xA700`` (out of
resources) when the disk or the database fails, ``0xC210`` (cannot understand) when the
dataset cannot be decoded or lacks valid Study/SOP Instance UIDs.

Logs at INFO name AE titles, UIDs and counts, never patient attributes.
"""
from __future__ import annotations

import logging
import sqlite3
import ssl
import struct
import threading
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
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from msk_node.service.config import NodeConfig, TlsConfig
from msk_node.service.jobs import JobStore
from msk_node.service.spool import Spool, is_valid_uid

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


def make_ae(config: NodeConfig, storage_transfer_syntaxes: Sequence[str] = STORAGE_TRANSFER_SYNTAXES) -> AE:
    """The node's application entity as SCP: Verification and every storage SOP class.

    Associations must call ``config.ae_title``; when ``allowed_calling_aes`` is not
    empty, only those calling AE titles are accepted (others are rejected at
    association, before any data is sent).
    """
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.require_called_aet = True
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(storage_transfer_syntaxes))
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
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, store, config, tally]),
        (evt.EVT_RELEASED, _handle_end, [tally]),
        (evt.EVT_ABORTED, _handle_end, [tally]),
    ]
    ssl_context = tls_context(config.tls) if config.tls is not None else None
    server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers,
                             ssl_context=ssl_context)
    logger.info("listening as %s on %s:%d (TLS %s, calling AEs %s)", config.ae_title, config.host,
                server.server_address[1], "on" if ssl_context else "off",
                ", ".join(config.allowed_calling_aes) or "any")
    return server
