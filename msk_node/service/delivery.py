"""Senders for results: C-STORE SCU, STOW-RS and the local folder store.

Each sender gets the instances not yet confirmed by its destination and calls
``confirm(sop_uid)`` for every instance the destination accepted, right away, so the job
store records it before the next one is sent. Anything else raises
:class:`DeliveryError` with a reason; the scheduler tries again later.
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
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from msk_node.service.config import Destination
from msk_node.service.spool import fsync_dir, is_valid_uid, open_private, private_dir

logger = logging.getLogger(__name__)

#: C-STORE statuses that mean the peer stored the instance (success and warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

Confirm = Callable[[str], None]


class DeliveryError(RuntimeError):
    """A destination did not take (all) the results; the message says why."""


@dataclass(frozen=True)
class ResultFile:
    """One result instance on disk."""

    path: Path
    sop_uid: str
    sop_class_uid: str
    study_uid: str
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
                                str(ds.file_meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as error:
            problems.append(f"{path.name} is not a readable DICOM result ({type(error).__name__})")
            continue
        if not is_valid_uid(result.sop_uid) or not is_valid_uid(result.study_uid):
            problems.append(f"{path.name} has no valid SOP/Study Instance UID")
            continue
        results.append(result)
    return results, problems


def send(destination: Destination, results: Sequence[ResultFile], confirm: Confirm, calling_ae: str) -> None:
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

    Raises
    ------
    DeliveryError
        If the destination is unreachable or refused any instance.
    """
    if not results:
        return
    if destination.type == "cstore":
        send_cstore(destination, results, confirm, calling_ae)
    elif destination.type == "stow":
        send_stow(destination, results, confirm)
    else:
        send_folder(destination, results, confirm)


def send_cstore(destination: Destination, results: Sequence[ResultFile], confirm: Confirm, calling_ae: str) -> None:
    """C-STORE every result over one association and check each returned status."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = 10
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
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
        raise DeliveryError(f"association with {destination.ae_title}@{destination.host}:{destination.port} {what}")
    failures = []
    try:
        for result in results:
            try:
                status = assoc.send_c_store(pydicom.dcmread(result.path))
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


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None:
        try:
            response = requests.post(url, data=body, headers=headers, timeout=120)
        except requests.RequestException as error:
            raise DeliveryError(f"STOW-RS to {url}: {error}") from error
        return response.status_code, response.content
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise DeliveryError(f"STOW-RS to {url}: {error}") from error


def _failed_sops(body: bytes) -> set[str] | None:
    """SOP Instance UIDs in a STOW-RS response's FailedSOPSequence; None if unreadable."""
    try:
        document = json.loads(body or b"{}")
        items = document.get("00081198", {}).get("Value", [])
        return {str(item["00081155"]["Value"][0]) for item in items}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def send_stow(destination: Destination, results: Sequence[ResultFile], confirm: Confirm) -> None:
    """POST all results to ``<url>/studies`` as one multipart/related request.

    HTTP 200 confirms every instance; 202 confirms all but those in the response's
    Failed SOP Sequence; anything else confirms none.
    """
    url = f"{destination.url}/studies"
    body, content_type = _multipart(results)
    status, content = _post(url, body, content_type)
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


def send_folder(destination: Destination, results: Sequence[ResultFile], confirm: Confirm) -> None:
    """Copy results to ``<path>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (temp + fsync + rename)."""
    assert destination.path is not None
    for result in results:
        folder = destination.path / result.study_uid
        try:
            private_dir(folder, parents=True)
            temp = folder / f".{result.sop_uid}.{uuid.uuid4().hex}.part"
            with open(result.path, "rb") as source, open_private(temp, exclusive=True) as target:
                shutil.copyfileobj(source, target)
                target.flush()
                os.fsync(target.fileno())
            os.replace(temp, folder / f"{result.sop_uid}.dcm")
            fsync_dir(folder)
        except OSError as error:
            raise DeliveryError(f"folder {destination.path}: {error}") from error
        confirm(result.sop_uid)
