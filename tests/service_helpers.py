"""Peers and stubs for the node service tests: a stub application, a C-STORE SCP and a
STOW-RS server that count what they receive, dcmtk wrappers, and a polling helper."""
from __future__ import annotations

import email.parser
import email.policy
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from msk_node_service import NodeConfig
from tests.dicom_checks import make_mr_series

NODE_AE = "MSKNODE"

#: The stub application. argv: MODE_FILE -i IN -o OUT -m MODELS. The mode file holds
#: "copy" (write one result: the first readable input with new UIDs and the input count
#: in ImageComments, with report.json and status.json as the application writes them), "crash" (raise), or
#: "sleep:SECONDS" (then copy).
STUB_APP = r'''
import json, sys, time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

mode_file, rest = Path(sys.argv[1]), sys.argv[2:]
source, target = Path(rest[rest.index("-i") + 1]), Path(rest[rest.index("-o") + 1])
mode = mode_file.read_text().strip()
if mode.startswith("sleep:"):
    time.sleep(float(mode.split(":", 1)[1]))
    mode = "copy"
if mode == "crash":
    raise RuntimeError("stub application crashed on purpose")
files = sorted(source.rglob("*.dcm"))
readable, skipped = [], []
for path in files:
    try:
        ds = pydicom.dcmread(path)
        ds.pixel_array
        readable.append(ds)
    except Exception as error:
        skipped.append({"source": path.name, "reason": f"cannot be decoded: {type(error).__name__}"})
result = readable[0]
result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid()
result.SeriesInstanceUID = generate_uid()
result.SeriesDescription = "stub result"
result.ImageComments = f"stub result from {len(files)} input(s)"
target.mkdir(parents=True, exist_ok=True)
result.save_as(target / f"seg-{result.SOPInstanceUID}.dcm", enforce_file_format=True)
report = {"series": [{"outcome": "segmented"}], "skipped": skipped}
(target / "report.json").write_text(json.dumps(report))
status = {"outcome": "ran", "exit_code": 0, "series": [{"series_instance_uid": "stub", "outcome": "segmented"}],
          "skipped": len(skipped), "results": [{"file": f"seg-{result.SOPInstanceUID}.dcm",
                                                 "sop_class_uid": str(result.SOPClassUID),
                                                 "sop_instance_uid": str(result.SOPInstanceUID)}]}
(target / "status.json").write_text(json.dumps(status))
'''


def stub_app(folder: Path, mode: str = "copy") -> tuple[list[str], Path]:
    """Write the stub application; returns ``(app_command, mode_file)``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "stub_app.py"
    script.write_text(STUB_APP)
    mode_file = folder / "stub_mode.txt"
    mode_file.write_text(mode)
    return [sys.executable, str(script), str(mode_file)], mode_file


def node_document(tmp_path: Path, app_command: Sequence[str] | None, destinations: list[dict], **overrides: Any
                  ) -> dict[str, Any]:
    """A test configuration document: port 0, 1 s stability, fast polling and retries; every study
    runs (the small synthetic studies are not ones the series-selection rules take)."""
    document: dict[str, Any] = {
        "ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "spool_dir": str(tmp_path / "spool"),
        "stable_after_s": 1, "poll_interval_s": 0.1, "retry_backoff_s": 0.2, "max_retry_backoff_s": 1,
        "job_timeout_s": 60, "destinations": destinations, "preselect_series": False,
    }
    if app_command is not None:
        document["app_command"] = list(app_command)
    document.update(overrides)
    return document


def node_config(tmp_path: Path, app_command: Sequence[str] | None, destinations: list[dict], **overrides: Any
                ) -> NodeConfig:
    """The configuration of :func:`node_document`."""
    return NodeConfig.from_mapping(node_document(tmp_path, app_command, destinations, **overrides), tmp_path)


def node_config_file(tmp_path: Path, app_command: Sequence[str] | None, destinations: list[dict],
                     **overrides: Any) -> Path:
    """:func:`node_document` as ``tmp_path/node.yaml``, for the ``msk-node`` commands."""
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_document(tmp_path, app_command, destinations, **overrides)))
    return path


def free_port() -> int:
    """A port that was free a moment ago (for peers that cannot bind port 0 themselves)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy and return its value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class StoreSCP:
    """A C-STORE destination (pynetdicom) that keeps every instance it receives, repeats included.

    Parameters
    ----------
    ae_title : str
    port : int
        0 for any free port.
    """

    def __init__(self, ae_title: str = "DEST", port: int = 0) -> None:
        self.ae_title = ae_title
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    @property
    def sop_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    @property
    def study_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.StudyInstanceUID) for ds in self.received]

    def destination(self) -> dict:
        return {"type": "cstore", "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.server.shutdown()


class StowServer:
    """A minimal STOW-RS endpoint: counts the DICOM parts of each POST to ``/dicom-web/studies``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests.append(self.path)
                header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
                parts = [part.get_payload(decode=True) for part in message.iter_parts()
                         if part.get_content_type() == "application/dicom"]
                owner.parts.extend(parts)
                payload = json.dumps({"00081199": {"vr": "SQ", "Value": []}}).encode()
                self.send_response(200 if self.path == "/dicom-web/studies" else 404)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_study(folder: Path, n: int = 4, patient_name: str = "Test^Knee", patient_id: str = "MSK0001",
               description: str = "synthetic PD", size: int = 16) -> list[Path]:
    """A small MR study (one series, its own Study Instance UID) written to ``folder``."""
    paths = make_mr_series(folder, n=n, rows=size, cols=size, drop=())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.SeriesDescription = patient_name, patient_id, description
        ds.save_as(path, enforce_file_format=True)
    return paths


def storescu(port: int, paths: Sequence[Path], calling: str = "SCU", called: str = NODE_AE,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """dcmtk ``storescu`` of files or folders (scanned recursively) in one association."""
    command = [shutil.which("storescu") or "storescu", "-aet", calling, "-aec", called, "+sd", "+r",
               "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def echoscu(port: int, calling: str = "SCU", called: str = NODE_AE) -> subprocess.CompletedProcess:
    """dcmtk ``echoscu``."""
    command = [shutil.which("echoscu") or "echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte header of an upper-layer PDU: type, reserved, length (big endian)."""
    return struct.pack(">BBL", pdu_type, 0, length)


#: What port scanners, health checks and broken peers send instead of an A-ASSOCIATE-RQ.
GARBAGE: dict[str, bytes] = {
    "nothing": b"",
    "http": b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n",
    "random": bytes(random.Random(7).randrange(256) for _ in range(300)),
    # protocol version 1, a called AE title that is not ASCII, calling AE, reserved, no items
    "bad A-ASSOCIATE-RQ": pdu_header(0x01, 68) + b"\x00\x01\x00\x00" + b"\xff" * 16 + b"SCU".ljust(16) + bytes(32),
    "4 GB PDU": pdu_header(0x04, 0xFFFFFFFF) + b"\x00" * 64,
}


def raw_connection(port: int, payload: bytes = b"", reset: bool = False) -> None:
    """Connect, send ``payload``, close (with a TCP reset when ``reset``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if payload:
            sock.sendall(payload)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def associate(port: int, calling: str = "SCU", called: str = NODE_AE, source: str | None = None):
    """A pynetdicom association (Verification) from ``source`` (a local address); the caller releases it."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called,
                        bind_address=(source, 0) if source is not None else None)


def echo_ok(port: int, source: str | None = None) -> bool:
    """A C-ECHO in its own association succeeded."""
    assoc = associate(port, source=source)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()
