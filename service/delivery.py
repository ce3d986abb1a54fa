"""Senders for results: C-STORE SCU, STOW-RS and the local folder store.

Each sender gets the instances not yet confirmed by its destination, calls
``sending(sop_uids)`` before it sends them, so the job store knows they may reach the
destination, and ``confirm(sop_uid)`` for every instance the destination accepted, right
away, so the job store records it before the next one is sent. Anything else raises
:class:`DeliveryError` with a reason; the scheduler tries again later.

:func:`find_stored` asks a destination which of the instances a crash left unconfirmed it
already holds (C-FIND, QIDO-RS or the file name), so they are not sent twice.
:func:`request_commitment` and :func:`handle_commitment_report` are the two halves of
DICOM Storage Commitment (Push Model) for C-STORE destinations that offer it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelFind

from msk_node_service.config import Destination
from msk_node_service.jobs import JobStore
from msk_node_service.spool import fsync_dir, is_valid_uid, open_private, private_dir

logger = logging.getLogger(__name__)

#: C-STORE statuses that mean the peer stored the instance (success and warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

#: C-FIND statuses of a match (pending, pending with optional keys unsupported) and of the end.
FIND_PENDING = frozenset({0xFF00, 0xFF01})
FIND_DONE = 0x0000
#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
COMMITMENT_INSTANCE_UID = "1.2.840.10008.1.20.1.1"
#: Storage Commitment N-EVENT-REPORT event types: all committed; some failed.
COMMITTED, COMMITTED_WITH_FAILURES = 1, 2
PROCESSING_FAILURE = 0x0110

Confirm = Callable[[str], None]
Sending = Callable[[Sequence[str]], None]


class DeliveryError(RuntimeError):
    """A destination did not take (all) the results; the message says why."""


@dataclass(frozen=True)
class ResultFile:
    """One result instance on disk."""

    path: Path
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str


def read_results(output_dir: Path) -> tuple[list[ResultFile], list[str]]:
    """The DICOM results of a job (``*.dcm`` under ``output_dir``).

    Returns
    -------
    tuple of (list of ResultFile, list of str)
        Readable results sorted by path, and one reason per file that could not be
        read (those are not sent).
    """
    results, problems = [], []
    for path in sorted(Path(output_dir).rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            result = ResultFile(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                                str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as error:
            problems.append(f"{path.name} is not a readable DICOM result ({type(error).__name__})")
            continue
        if not is_valid_uid(result.sop_uid) or not is_valid_uid(result.study_uid):
            problems.append(f"{path.name} has no valid SOP/Study Instance UID")
            continue
        results.append(result)
    return results, problems


def _ignore(sop_uids: Sequence[str]) -> None:
    """The default ``sending``: nothing to record."""


def send(destination: Destination, results: Sequence[ResultFile], confirm: Confirm, calling_ae: str,
         sending: Sending = _ignore) -> None:
    """Send ``results`` to one destination, confirming each accepted instance.

    Parameters
    ----------
    destination : Destination
    results : sequence of ResultFile
        Instances not yet confirmed by this destination.
    confirm : callable
        Called with each SOP Instance UID the destination accepted.
    calling_ae : str
        Our AE title (C-STORE).
    sending : callable
        Called with the SOP Instance UIDs about to be sent, before they leave.

    Raises
    ------
    DeliveryError
        If the destination is unreachable or refused any instance.
    """
    if not results:
        return
    if destination.type == "cstore":
        send_cstore(destination, results, confirm, calling_ae, sending)
    elif destination.type == "stow":
        send_stow(destination, results, confirm, sending)
    else:
        send_folder(destination, results, confirm, sending)


def _client_ae(calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = 10
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    return ae


def _peer(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def send_cstore(destination: Destination, results: Sequence[ResultFile], confirm: Confirm, calling_ae: str,
                sending: Sending = _ignore) -> None:
    """C-STORE every result over one association and check each returned status."""
    ae = _client_ae(calling_ae)
    contexts: dict[str, list[str]] = {}
    for result in results:
        syntaxes = contexts.setdefault(result.sop_class_uid, [])
        for syntax in (result.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    if len(contexts) > 128:
        raise DeliveryError(f"{len(contexts)} SOP classes do not fit one association")
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise DeliveryError(f"association with {_peer(destination)} {what}")
    failures = []
    try:
        for result in results:
            try:
                dataset = pydicom.dcmread(result.path)
                sending([result.sop_uid])
                status = assoc.send_c_store(dataset)
            except (ValueError, RuntimeError) as error:  # no accepted context; association gone
                failures.append(f"{result.sop_uid}: {error}")
                if not assoc.is_established:
                    break
                continue
            code = int(status.Status) if "Status" in status else None
            if code in STORED_STATUSES:
                confirm(result.sop_uid)
            else:
                failures.append(f"{result.sop_uid}: " + ("no response" if code is None else f"status 0x{code:04X}"))
                if not assoc.is_established:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    if failures:
        raise DeliveryError(f"{len(failures)} of {len(results)} not stored: {'; '.join(failures[:3])}")


def _multipart(results: Sequence[ResultFile]) -> tuple[bytes, str]:
    boundary = f"msk-node-{uuid.uuid4().hex}"
    parts = []
    for result in results:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(result.path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _http(url: str, body: bytes | None = None, content_type: str = "", what: str = "STOW-RS") -> tuple[int, bytes]:
    """POST ``body`` (GET without one) to ``url``; returns the status and the response body.

    Raises
    ------
    DeliveryError
        If no HTTP response came back (connection refused, timeout).
    """
    headers = {"Accept": "application/dicom+json"}
    if body is not None:
        headers["Content-Type"] = content_type
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise DeliveryError(f"{what} to {url}: {error}") from error


def _failed_sops(body: bytes) -> set[str] | None:
    """SOP Instance UIDs in a STOW-RS response's FailedSOPSequence; None if unreadable."""
    try:
        document = json.loads(body or b"{}")
        items = document.get("00081198", {}).get("Value", [])
        return {str(item["00081155"]["Value"][0]) for item in items}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def send_stow(destination: Destination, results: Sequence[ResultFile], confirm: Confirm,
              sending: Sending = _ignore) -> None:
    """POST all results to ``<url>/studies`` as one multipart/related request.

    HTTP 200 confirms every instance; 202 confirms all but those in the response's
    Failed SOP Sequence; anything else confirms none.
    """
    url = f"{destination.url}/studies"
    body, content_type = _multipart(results)
    sending([result.sop_uid for result in results])
    status, content = _http(url, body, content_type)
    if status == 200:
        for result in results:
            confirm(result.sop_uid)
        return
    if status == 202:
        failed = _failed_sops(content)
        if failed is None:
            raise DeliveryError(f"STOW-RS to {url}: HTTP 202 with an unreadable response")
        for result in results:
            if result.sop_uid not in failed:
                confirm(result.sop_uid)
        if failed:
            raise DeliveryError(f"STOW-RS to {url}: {len(failed)} of {len(results)} instances failed")
        return
    raise DeliveryError(f"STOW-RS to {url}: HTTP {status}")


def stored_path(destination: Destination, result: ResultFile) -> Path:
    """Where the folder store keeps one result: ``<path>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``."""
    assert destination.path is not None
    return destination.path / result.study_uid / f"{result.sop_uid}.dcm"


def send_folder(destination: Destination, results: Sequence[ResultFile], confirm: Confirm,
                sending: Sending = _ignore) -> None:
    """Copy results to :func:`stored_path` (temp + fsync + rename)."""
    for result in results:
        target = stored_path(destination, result)
        folder = target.parent
        sending([result.sop_uid])
        try:
            private_dir(folder, parents=True)
            temp = folder / f".{result.sop_uid}.{uuid.uuid4().hex}.part"
            with open(result.path, "rb") as source, open_private(temp, exclusive=True) as copy:
                shutil.copyfileobj(source, copy)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(temp, target)
            fsync_dir(folder)
        except OSError as error:
            raise DeliveryError(f"folder {destination.path}: {error}") from error
        confirm(result.sop_uid)


def find_stored(destination: Destination, results: Sequence[ResultFile], calling_ae: str
                ) -> tuple[set[str], str | None]:
    """Which of ``results`` the destination already holds.

    Returns
    -------
    tuple of (set of str, str or None)
        The SOP Instance UIDs found, and why the destination could not answer for the
        others (it does not support the query), or None when it answered for all.

    Raises
    ------
    DeliveryError
        If the destination is unreachable: nothing is known and nothing can be sent.
    """
    if not results:
        return set(), None
    if destination.type == "cstore":
        return find_cstore(destination, results, calling_ae)
    if destination.type == "stow":
        return find_qido(destination, results)
    return {result.sop_uid for result in results if stored_path(destination, result).is_file()}, None


def find_cstore(destination: Destination, results: Sequence[ResultFile], calling_ae: str
                ) -> tuple[set[str], str | None]:
    """C-FIND (Study Root, IMAGE level) for each result by its Study, Series and SOP Instance UIDs."""
    ae = _client_ae(calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:  # pynetdicom aborts when the peer accepts no requested context
        if assoc.is_rejected or assoc.rejected_contexts:
            return set(), f"{_peer(destination)} rejected a Study Root C-FIND association"
        what = "aborted" if assoc.is_aborted else "not established"
        raise DeliveryError(f"C-FIND association with {_peer(destination)} {what}")
    found: set[str] = set()
    try:
        for result in results:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = result.study_uid
            query.SeriesInstanceUID = result.series_uid
            query.SOPInstanceUID = result.sop_uid
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise DeliveryError(f"C-FIND to {_peer(destination)}: no response")
                if code in FIND_PENDING:
                    if identifier is not None and str(identifier.get("SOPInstanceUID", "")) == result.sop_uid:
                        found.add(result.sop_uid)
                elif code != FIND_DONE:
                    return found, f"C-FIND to {_peer(destination)} answered status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return found, None


def find_qido(destination: Destination, results: Sequence[ResultFile]) -> tuple[set[str], str | None]:
    """QIDO-RS ``<url>/studies/{study}/instances?SOPInstanceUID={sop}`` for each result."""
    found: set[str] = set()
    for result in results:
        url = f"{destination.url}/studies/{result.study_uid}/instances?SOPInstanceUID={result.sop_uid}"
        status, body = _http(url, what="QIDO-RS")
        if status == 204:  # no match
            continue
        if status != 200:
            return found, f"QIDO-RS to {destination.url}: HTTP {status}"
        try:
            matches = [str(item["00080018"]["Value"][0]) for item in json.loads(body or b"[]")]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            return found, f"QIDO-RS to {destination.url}: unreadable response ({type(error).__name__})"
        if result.sop_uid in matches:
            found.add(result.sop_uid)
    return found, None


def request_commitment(destination: Destination, results: Sequence[ResultFile], transaction_uid: str,
                       calling_ae: str) -> None:
    """Ask a C-STORE destination to commit ``results`` (N-ACTION, Storage Commitment Push Model).

    The destination answers later with an N-EVENT-REPORT on an association to the node's
    listener (:func:`handle_commitment_report`); a report sent on this association before
    it is released is not read.

    Raises
    ------
    DeliveryError
        If the destination is unreachable, does not offer Storage Commitment or refuses the request.
    """
    ae = _client_ae(calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected or assoc.rejected_contexts:
            raise DeliveryError(f"{_peer(destination)} does not offer Storage Commitment")
        raise DeliveryError(f"association with {_peer(destination)} {'aborted' if assoc.is_aborted else 'failed'}")
    try:
        request = Dataset()
        request.TransactionUID = transaction_uid
        request.ReferencedSOPSequence = []
        for result in results:
            reference = Dataset()
            reference.ReferencedSOPClassUID = result.sop_class_uid
            reference.ReferencedSOPInstanceUID = result.sop_uid
            request.ReferencedSOPSequence.append(reference)
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE_UID)
        code = int(status.Status) if "Status" in status else None
        if code != 0x0000:
            raise DeliveryError(f"N-ACTION to {_peer(destination)}: "
                                + ("no response" if code is None else f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()


def handle_commitment_report(event: evt.Event, store: JobStore) -> tuple[int, None]:
    """EVT_N_EVENT_REPORT handler of the listener: record a Storage Commitment result."""
    try:
        report = event.event_information
        kind = event.event_type
        transaction_uid = str(report.TransactionUID)
        committed = [str(item.ReferencedSOPInstanceUID) for item in report.get("ReferencedSOPSequence", [])]
        failed = [str(item.ReferencedSOPInstanceUID) for item in report.get("FailedSOPSequence", [])]
    except (AttributeError, KeyError, ValueError, TypeError) as error:
        logger.warning("unreadable storage commitment report: %s", error)
        return PROCESSING_FAILURE, None
    if kind not in (COMMITTED, COMMITTED_WITH_FAILURES):
        logger.warning("storage commitment report of unknown event type %s", kind)
        return PROCESSING_FAILURE, None
    job_id = store.record_commitment_report(transaction_uid, committed, failed)
    if job_id is None:
        logger.warning("storage commitment report for transaction %s, which the node did not request",
                       transaction_uid)
    else:
        logger.info("job %d: storage commitment %s: %d committed, %d failed", job_id, transaction_uid,
                    len(committed), len(failed))
    return 0x0000, None
