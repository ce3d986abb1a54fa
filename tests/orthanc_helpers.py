"""Orthanc + msk-node side by side, for tests/test_orthanc.py.

Debian's Orthanc 1.10.1 listens on every interface and has no bind-address option, so
each scenario runs inside a private network namespace that has only loopback (and a
private PID namespace, so that nothing it started outlives it):

    unshare --net --pid --mount-proc --fork --kill-child -- \\
        bash -c 'ip link set lo up && exec python -m tests.orthanc_helpers ARGS.json'

:func:`run_scenario` (pytest side) launches that and reads the driver's result JSON;
:func:`main` (the driver, inside the namespace) starts Orthanc with a copy of
``orthanc/orthanc.json`` whose paths point into the work folder, starts the node in
process from ``orthanc/node.yaml``, plays the scenario, writes ``result.json`` and stops
everything. Inside the namespace the shipped ports are free: Orthanc DICOM 4242 and
HTTP 8042, the node 11112.

With ``trace_dicom`` Orthanc also logs every incoming DIMSE message and the keys of each
C-FIND, UIDs shown; :func:`incoming_stores` and :func:`incoming_finds` count them.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from tests.service_helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
ORTHANC_DIR = REPO / "orthanc"
PLUGIN_FILES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                "/usr/share/orthanc/plugins/libOrthancPython.so")
SCANNER_AE = "SCANNER"
ORTHANC_AE = "ORTHANC"
NAMESPACE = ["unshare", "--net", "--pid", "--mount-proc", "--fork", "--kill-child", "--"]
#: SOP classes of the clinician report: its PDF and its page as an image.
ENCAPSULATED_PDF, SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.7"

#: A fast stand-in for the application that still writes a genuine msk-node DICOM-SEG
#: (msk_node.seg_writer, Manufacturer "msk-node") of the largest MR series, from a
#: threshold. argv: LABEL_MAP -i IN -o OUT -m MODELS.
STUB_SEG_APP = r'''
import json, sys
from pathlib import Path

import numpy as np
import pydicom

from msk_node.labels import load_label_map
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, write_segmentation

label_map, rest = Path(sys.argv[1]), sys.argv[2:]
source, target = Path(rest[rest.index("-i") + 1]), Path(rest[rest.index("-o") + 1])
series = {}
for path in sorted(source.rglob("*.dcm")):
    ds = pydicom.dcmread(path)
    if ds.get("Modality") == "MR" and "PixelData" in ds:
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
images = max(series.values(), key=len)
normal = np.cross(*np.reshape(np.array(images[0].ImageOrientationPatient, float), (2, 3)))
images.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
volume = np.stack([ds.pixel_array for ds in images]).astype(float)
labels = (volume > np.percentile(volume, 90)).astype(np.uint8)
seg = build_segmentation(images, labels, load_label_map(label_map), AlgorithmInfo("stub", "0", "0" * 64),
                         series_description="stub segmentation")
target.mkdir(parents=True, exist_ok=True)
write_segmentation(seg, target / "seg.dcm")
(target / "report.json").write_text(json.dumps({"series": [{"outcome": "segmented"}], "skipped": []}))
'''


#: The node, killed with SIGKILL the moment it would record a destination's confirmation:
#: after the destination stored the result, before the job store knows. argv: CONFIG.
CRASHING_NODE = r'''
import os, signal, sys

from msk_node.cli import main
from msk_node_service.jobs import JobStore


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


JobStore.record_delivery = die
sys.exit(main(["serve", "--config", sys.argv[1]]))
'''


# -- pytest side -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def skip_reason() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    for tool, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk"), ("unshare", "util-linux"),
                          ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (Debian package {package}; scripts/setup.sh --test installs it)"
    for plugin in PLUGIN_FILES:
        if not Path(plugin).is_file():
            return f"{plugin} missing (Debian packages orthanc-dicomweb, orthanc-python)"
    if os.geteuid() != 0:
        return "Orthanc listens on every interface; the tests need root for a private network namespace (unshare --net)"
    probe = subprocess.run([*NAMESPACE, "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        return f"cannot create a private network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


def run_scenario(workdir: Path, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the driver in a private network + PID namespace; returns its result.

    Everything the driver started dies with the namespace, also when ``timeout`` kills it.

    Raises
    ------
    AssertionError
        If the driver timed out or wrote no result; the message has the tail of its logs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    args_path = workdir / "args.json"
    args_path.write_text(json.dumps({**args, "workdir": str(workdir)}))
    command = [*NAMESPACE, "bash", "-c", 'ip link set lo up && exec "$0" -m tests.orthanc_helpers "$1"',
               sys.executable, str(args_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                                 check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the scenario ran past {timeout} s and was killed\n{log_tails(workdir)}") from None
    result_path = workdir / "result.json"
    if not result_path.is_file():
        raise AssertionError(f"the driver wrote no result (exit {process.returncode})\n{process.stdout[-3000:]}"
                             f"{process.stderr[-3000:]}\n{log_tails(workdir)}")
    return json.loads(result_path.read_text())


def log_tails(workdir: Path, chars: int = 4000) -> str:
    """The ends of the driver's and Orthanc's logs, for failure messages."""
    parts = []
    for name in ("driver.log", "orthanc.log"):
        path = workdir / name
        if path.is_file():
            parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


# -- inside the namespace: peers ---------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1


class Orthanc:
    """An Orthanc process with a copy of ``orthanc/orthanc.json`` adapted to ``workdir``."""

    def __init__(self, workdir: Path, stable_age: int = 1, retry_delay: float = 1, trace_dicom: bool = False) -> None:
        config = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
        config.update(StorageDirectory=str(workdir / "orthanc-storage"), IndexDirectory=str(workdir / "orthanc-index"),
                      StableAge=stable_age, PythonScript=str(ORTHANC_DIR / "msk_forward.py"))
        if trace_dicom:  # phantom data only: the UIDs must be readable in the log
            config["DeidentifyLogs"] = False
        self.log_options = ["--verbose", "--trace-dicom"] if trace_dicom else ["--verbose"]
        scanner = config["DicomModalities"]["scanner"]
        config["DicomModalities"]["scanner"] = [scanner[0], "127.0.0.1", scanner[2]]
        config["MskNode"]["StoreRetryDelay"] = retry_delay
        self.config = config
        self.http = f"http://127.0.0.1:{config['HttpPort']}"
        self.dicom_port = int(config["DicomPort"])
        self.config_path = workdir / "orthanc-config.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Orthanc:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(["Orthanc", *self.log_options, str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode} at start-up")
            try:
                plugins = self.get("/plugins")
                if "dicom-web" in plugins and "python" in plugins:
                    return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not answer within %s s" % timeout)
            time.sleep(0.2)

    def request(self, path: str, data: bytes | None = None, accept: str = "application/json") -> Any:
        body = self.raw(path, data, accept)
        return json.loads(body) if body else None

    def raw(self, path: str, data: bytes | None = None, accept: str = "application/json") -> bytes:
        """The body of a request to ``path`` (relative to Orthanc's HTTP root, or a full URL it gave)."""
        url = path if path.startswith("http") else self.http + path
        request = urllib.request.Request(url, data=data, headers={"Accept": accept},
                                         method="GET" if data is None else "POST")
        with _OPENER.open(request, timeout=30) as response:
            return response.read()

    def viewer_reads(self, study_uid: str, series: list[dict]) -> dict[str, Any]:
        """What a DICOMweb viewer (OHIF) fetches to show the report: the Encapsulated PDF's document from
        its metadata's bulk data URI, and the Secondary Capture's first frame."""
        multipart = 'multipart/related; type="application/octet-stream"'
        reads: dict[str, Any] = {}
        for entry in series:
            if entry["sop_classes"] not in ([ENCAPSULATED_PDF], [SECONDARY_CAPTURE]):
                continue
            root = f"/dicom-web/studies/{study_uid}/series/{entry['series_uid']}"
            (metadata,) = self.get(f"{root}/metadata", accept="application/dicom+json")
            instance = f"{root}/instances/{metadata['00080018']['Value'][0]}"
            if entry["sop_classes"] == [ENCAPSULATED_PDF]:
                document = metadata["00420011"]
                body = (base64.b64decode(document["InlineBinary"]) if "InlineBinary" in document
                        else self.raw(document["BulkDataURI"], accept=multipart))
                start = body.find(b"%PDF-")
                reads["pdf"] = {"mime": metadata["00420012"]["Value"][0], "found": start >= 0,
                                "ends_with_eof": b"%%EOF" in body[start:]}
            else:
                rows, columns = metadata["00280010"]["Value"][0], metadata["00280011"]["Value"][0]
                body = self.raw(f"{instance}/frames/1", accept=multipart)
                reads["sc"] = {"photometric": metadata["00280004"]["Value"][0], "rows": rows, "columns": columns,
                               "frame_bytes_at_least": len(body) >= rows * columns * 3}
        return reads

    def get(self, path: str, accept: str = "application/json") -> Any:
        return self.request(path, accept=accept)

    def decisions(self, study_uid: str | None = None) -> list[dict]:
        """The plugin's decisions (``GET /msk-node/decisions``), optionally of one study."""
        rows = self.get("/msk-node/decisions")
        return [row for row in rows if study_uid is None or row.get("study_uid") == study_uid]

    def store_jobs(self) -> list[dict]:
        """Orthanc's C-STORE jobs to the node."""
        return [job for job in self.get("/jobs?expand") if job.get("Type") == "DicomModalityStore"
                and job.get("Content", {}).get("RemoteAet") == "MSKNODE"]

    def qido_series(self, study_uid: str) -> list[dict]:
        """QIDO-RS series of a study: Modality, Manufacturer, SeriesInstanceUID, instance count, SOP classes."""
        try:
            rows = self.get(f"/dicom-web/studies/{study_uid}/series?includefield=00080070",
                            accept="application/dicom+json")
        except urllib.error.HTTPError as error:
            if error.code in (204, 404):
                return []
            raise
        def value(row: dict, tag: str) -> Any:
            values = row.get(tag, {}).get("Value", [None])
            return values[0] if values else None
        series = [{"modality": value(row, "00080060"), "manufacturer": value(row, "00080070"),
                   "series_uid": value(row, "0020000E"), "instances": value(row, "00201209")} for row in rows or []]
        for entry in series:
            instances = self.get(f"/dicom-web/studies/{study_uid}/series/{entry['series_uid']}/instances",
                                 accept="application/dicom+json")
            entry["sop_classes"] = sorted({value(row, "00080016") for row in instances or []})
        return series

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def storescu(port: int, paths: list[Path], calling: str = SCANNER_AE, called: str = ORTHANC_AE) -> None:
    """dcmtk storescu of files or folders; raises when it fails."""
    command = ["storescu", "-R", "-aet", calling, "-aec", called, "+sd", "+r", "127.0.0.1", str(port), *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")


def incoming_stores(log_text: str) -> Counter:
    """C-STORE requests in a ``--trace-dicom`` Orthanc log, counted by Affected SOP Instance UID."""
    counts: Counter = Counter()
    for message in re.findall(r"INCOMING DIMSE MESSAGE =+\n(.*?)=+ END DIMSE MESSAGE", log_text, re.S):
        kind = re.search(r"^Message Type\s*: (.+)$", message, re.M)
        sop = re.search(r"^Affected SOP Instance UID\s*: (\S+)", message, re.M)
        if kind and kind[1].strip() == "C-STORE RQ" and sop:
            counts[sop[1]] += 1
    return counts


def incoming_finds(log_text: str) -> Counter:
    """C-FIND requests with a SOP Instance UID key in a ``--trace-dicom`` Orthanc log, by that UID."""
    return Counter(re.findall(r"OrthancFindRequestHandler\.cpp:\d+\] \(dicom\)\s+\(0008,0018\)\s+"
                              r"SOPInstanceUID = (\S+)", log_text))


def node_config(workdir: Path, app: str, destination: str, models_dir: str | None, orthanc: Orthanc):
    """``orthanc/node.yaml`` with the spool in ``workdir`` and test timings."""
    from msk_node_service import NodeConfig

    return NodeConfig.from_mapping(node_document(workdir, app, destination, models_dir, orthanc), ORTHANC_DIR)


def node_document(workdir: Path, app: str, destination: str, models_dir: str | None, orthanc: Orthanc) -> dict:
    """The YAML document of :func:`node_config`."""
    import yaml

    document = yaml.safe_load((ORTHANC_DIR / "node.yaml").read_text())
    document.update(spool_dir=str(workdir / "node-spool"), stable_after_s=1, poll_interval_s=0.2,
                    retry_backoff_s=0.5, max_retry_backoff_s=2, job_timeout_s=300, max_attempts=1)
    if destination == "stow":
        document["destinations"] = [{"type": "stow", "url": f"{orthanc.http}/dicom-web"}]
    if models_dir:
        document["models_dir"] = models_dir
    if app == "stub":
        script = workdir / "stub_seg_app.py"
        script.write_text(STUB_SEG_APP)
        label_map = Path(models_dir or REPO / "models") / "detector" / "label_map.yaml"
        document["app_command"] = [sys.executable, str(script), str(label_map)]
    return document


def node_jobs(config) -> list[dict]:
    from msk_node_service import status

    keep = ("id", "study_uid", "state", "attempts", "reason", "calling_ae", "input_instances", "deliveries")
    return [{key: row.get(key) for key in keep} for row in status(config)]


# -- inside the namespace: scenarios ------------------------------------------------------

def scenario_forward(args: dict, workdir: Path, orthanc: Orthanc, log: logging.Logger) -> dict:
    """A phantom knee study into Orthanc -> plugin -> node -> SEG back into the same study."""
    import pydicom

    from msk_node_phantoms import write_phantom
    from msk_node_service import Node

    if args.get("study_dir"):  # a study prepared by the test (the real knee), else a knee phantom
        study_dir = Path(args["study_dir"])
    else:
        study_dir = write_phantom("knee", workdir / "knee", seed=args.get("seed", 7),
                                  n_slices=args.get("n_slices", 16)) / "dicom"
    files = sorted(study_dir.rglob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    identifiers = [str(v) for v in (first.get("PatientName"), first.get("PatientID")) if v]
    config = node_config(workdir, args["app"], args.get("destination", "cstore"), args.get("models_dir"), orthanc)
    node = None if args.get("node_late") else Node(config).start()
    times: dict[str, float] = {}
    result: dict[str, Any] = {"study_uid": study_uid, "instances": len(files), "patient_identifiers": identifiers,
                              "times": times}
    try:
        t0 = time.monotonic()
        storescu(orthanc.dicom_port, [study_dir])
        times["stored"] = time.monotonic() - t0
        log.info("study stored in Orthanc: %d instance(s)", len(files))
        wait_for(lambda: any(d["action"] == "forwarded" for d in orthanc.decisions(study_uid)), 30, interval=0.25, what="forwarded")
        times["forwarded"] = time.monotonic() - t0
        if node is None:  # the node is down: the plugin must retry the store job
            wait_for(lambda: any(d["action"] == "retrying" for d in orthanc.decisions(study_uid)), 30, interval=0.25, what="retrying")
            times["retrying"] = time.monotonic() - t0
            node = Node(config).start()
            log.info("node started late")
        wait_for(lambda: [j for j in node_jobs(config) if j["state"] in ("delivered", "dead", "failed")],
                 args.get("job_timeout", 150), interval=0.5, what="the node's job to end")
        times["node_job_ended"] = time.monotonic() - t0
        result["node_jobs"] = node_jobs(config)
        if result["node_jobs"][0]["state"] == "delivered":
            wait_for(lambda: any(s["modality"] == "SEG" for s in orthanc.qido_series(study_uid)), 30, interval=0.25, what="a SEG series in QIDO-RS")
            times["seg_in_qido"] = time.monotonic() - t0

            def second_decision() -> bool:
                rows = orthanc.decisions(study_uid)
                forwarded = max(i for i, d in enumerate(rows) if d["action"] == "forwarded")
                return any(d["action"] == "skipped" and d.get("own_results", 0) >= 1 for d in rows[forwarded + 1:])

            wait_for(second_decision, 30, interval=0.25, what="the plugin's decision on the study with the SEG")
            times["seg_study_decided"] = time.monotonic() - t0
            # Give a wrong second forward the time to show up (StableAge + node stability).
            time.sleep(3)
        result["node_jobs"] = node_jobs(config)
        result["qido_series"] = orthanc.qido_series(study_uid)
        result["viewer_reads"] = orthanc.viewer_reads(study_uid, result["qido_series"])
        result["decisions"] = orthanc.decisions(study_uid)
        result["store_jobs"] = [{"state": j["State"], "instances": j["Content"].get("InstancesCount")}
                                for j in orthanc.store_jobs()]
        times["total"] = time.monotonic() - t0
    finally:
        if node is not None:
            node.stop()
    return result


def scenario_filter(args: dict, workdir: Path, orthanc: Orthanc, log: logging.Logger) -> dict:
    """Studies that must not be forwarded: CT of the knee, MR of the brain, only msk-node results."""
    import pydicom
    from pydicom.uid import CTImageStorage

    from msk_node_phantoms import write_phantom
    from msk_node_service import Node
    from tests.service_helpers import make_study

    studies: dict[str, str] = {}
    ct = make_study(workdir / "ct", n=4, description="CT knee")
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.Modality, ds.BodyPartExamined = "CT", "KNEE"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.save_as(path, enforce_file_format=True)
    brain = make_study(workdir / "brain", n=4, description="Ax T2 FLAIR brain")
    for path in brain:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path, enforce_file_format=True)
    studies["ct_knee"] = str(pydicom.dcmread(ct[0]).StudyInstanceUID)
    studies["mr_brain"] = str(pydicom.dcmread(brain[0]).StudyInstanceUID)
    # A SEG of a knee study whose MR images are not in Orthanc: only our own result.
    case = write_phantom("knee", workdir / "knee", seed=11, n_slices=8)
    script = workdir / "stub_seg_app.py"
    script.write_text(STUB_SEG_APP)
    label_map = REPO / "models" / "detector" / "label_map.yaml"
    subprocess.run([sys.executable, str(script), str(label_map), "-i", str(case / "dicom"), "-o", str(workdir / "seg"),
                    "-m", "unused"], check=True, timeout=120, capture_output=True)
    seg_file = workdir / "seg" / "seg.dcm"
    studies["seg_only"] = str(pydicom.dcmread(seg_file, stop_before_pixels=True).StudyInstanceUID)

    config = node_config(workdir, "stub", "cstore", None, orthanc)
    node = Node(config).start()
    t0 = time.monotonic()
    try:
        storescu(orthanc.dicom_port, [workdir / "ct", workdir / "brain", seg_file])
        log.info("three studies stored in Orthanc")
        wait_for(lambda: all(orthanc.decisions(uid) for uid in studies.values()), 30, interval=0.25, what="decisions on all studies")
        time.sleep(3)  # a forward would reach the node (stability 1 s) within this
        return {"studies": studies, "decisions": {name: orthanc.decisions(uid) for name, uid in studies.items()},
                "node_jobs": node_jobs(config), "store_jobs": orthanc.store_jobs(),
                "times": {"total": time.monotonic() - t0}}
    finally:
        node.stop()


def scenario_crash(args: dict, workdir: Path, orthanc: Orthanc, log: logging.Logger) -> dict:
    """The node dies (SIGKILL) after Orthanc stored its SEG and before it recorded that; the
    restarted node asks Orthanc (C-FIND) instead of sending the SEG again, or, with
    ``query_before_resend`` false, sends it again."""
    import yaml

    from msk_node_phantoms import write_phantom
    from msk_node_service import JobStore, Node, NodeConfig
    from msk_node_service.delivery import read_results

    case = write_phantom("knee", workdir / "knee", seed=args.get("seed", 5), n_slices=args.get("n_slices", 8))
    config_path = workdir / "node.yaml"
    document = node_document(workdir, "stub", "cstore", None, orthanc)
    document["destinations"][0]["query_before_resend"] = args.get("query_before_resend", True)
    config_path.write_text(yaml.safe_dump(document))
    config = NodeConfig.load(config_path)
    script = workdir / "crashing_node.py"
    script.write_text(CRASHING_NODE)
    with open(workdir / "crashing-node.log", "wb") as output:
        crashing = subprocess.Popen([sys.executable, str(script), str(config_path)], cwd=REPO, stdout=output,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex((config.host, config.port)) == 0

    wait_for(listening, 60, interval=0.25, what="the node to listen")
    storescu(config.port, [case / "dicom"], calling=ORTHANC_AE, called=config.ae_title)
    log.info("study stored in the node; waiting for it to die at its first confirmation")
    result: dict[str, Any] = {"exit": crashing.wait(120)}
    store = JobStore(config.database)
    try:
        (job,) = store.jobs()
        (seg,) = read_results(Path(job.output_dir or ""))[0]
        key = config.destinations[0].key
        result["sop_uid"] = seg.sop_uid
        result["after_crash"] = {"state": job.state, "in_doubt": sorted(store.in_doubt(job.id, key)),
                                 "delivered": sorted(store.delivered(job.id, key)),
                                 "stores": incoming_stores(orthanc.log_path.read_text(errors="replace"))}
    finally:
        store.close()
    node = Node(config).start()
    log.info("node restarted")
    try:
        wait_for(lambda: node_jobs(config)[0]["state"] == "delivered", 60, interval=0.25, what="delivered")
    finally:
        node.stop()
    time.sleep(1)  # Orthanc's log lags its answers a little
    text = orthanc.log_path.read_text(errors="replace")
    from msk_node_service import status

    result.update(node_jobs=node_jobs(config), history=status(config)[0]["history"], stores=incoming_stores(text),
                  finds=incoming_finds(text))
    return result


def scenario_commitment(args: dict, workdir: Path, orthanc: Orthanc, log: logging.Logger) -> dict:
    """The node delivers its SEG to Orthanc with Storage Commitment; Orthanc reports on a new
    association to the node's listener."""
    from msk_node_phantoms import write_phantom
    from msk_node_service import JobStore, Node, NodeConfig, status
    from msk_node_service.delivery import read_results

    case = write_phantom("knee", workdir / "knee", seed=args.get("seed", 5), n_slices=args.get("n_slices", 8))
    document = node_document(workdir, "stub", "cstore", None, orthanc)
    document["destinations"][0]["storage_commitment"] = True
    config = NodeConfig.from_mapping(document, ORTHANC_DIR)
    node = Node(config).start()
    try:
        storescu(config.port, [case / "dicom"], calling=ORTHANC_AE, called=config.ae_title)
        wait_for(lambda: node_jobs(config)[0]["state"] == "delivered", 60, interval=0.25, what="delivered")
        wait_for(lambda: any("committed by" in line for line in status(config)[0]["history"]), 30, interval=0.25,
                 what="the storage commitment report")
    finally:
        node.stop()
    store = JobStore(config.database)
    try:
        (job,) = store.jobs()
        (seg,) = read_results(Path(job.output_dir or ""))[0]
        commitments = store.commitments(job.id, config.destinations[0].key)
    finally:
        store.close()
    text = orthanc.log_path.read_text(errors="replace")
    return {"sop_uid": seg.sop_uid, "commitments": commitments, "history": status(config)[0]["history"],
            "orthanc_reports": re.findall(r'Reporting modality "[^"]+" about storage commitment transaction: '
                                          r"(\S+) \((\d+) successes, (\d+) failures\)", text)}


SCENARIOS = {"forward": scenario_forward, "filter": scenario_filter, "crash": scenario_crash,
             "commitment": scenario_commitment}


def main(argv: list[str]) -> int:
    args = json.loads(Path(argv[0]).read_text())
    workdir = Path(args["workdir"])
    logging.basicConfig(filename=workdir / "driver.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("orthanc-driver")
    result: dict[str, Any] = {"scenario": args["scenario"]}
    orthanc = Orthanc(workdir, stable_age=args.get("stable_age", 1), retry_delay=args.get("retry_delay", 1),
                      trace_dicom=args.get("trace_dicom", False))
    try:
        t0 = time.monotonic()
        orthanc.start()
        result["orthanc_start_s"] = time.monotonic() - t0
        log.info("Orthanc up in %.1f s", result["orthanc_start_s"])
        result.update(SCENARIOS[args["scenario"]](args, workdir, orthanc, log))
    except Exception as error:  # noqa: BLE001 - reported to the test through result.json
        log.exception("scenario failed")
        result["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        try:
            result.setdefault("decisions", orthanc.decisions())
        except Exception:  # noqa: BLE001
            pass
    finally:
        orthanc.stop()
    plugin_lines = [line for line in orthanc.log_path.read_text(errors="replace").splitlines() if "msk-forward" in line]
    result["plugin_log"] = plugin_lines
    (workdir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
