"""The PACS node service against real peers on localhost: dcmtk storescu/echoscu,
pynetdicom and dcmtk SCPs, a STOW-RS endpoint; a stub application for speed and one
end-to-end run of the real application."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from msk_node import cli
from msk_node_service import ConfigError, JobStore, NodeConfig, association_health, status
from msk_node_service.app_worker import AppPidFile, process_start
from msk_node_service.delivery import read_results, send_cstore, stored_path
from msk_node_service.listener import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from msk_node_service.spool import Spool
from msk_node_service.worker import Worker
from msk_node.sr_writer import read_measurements
from msk_node.status import EXIT_BAD_MODELS
from tests.dicom_checks import dciodvfy_errors, sr_validator_errors, tid1500_read
from tests.service_helpers import (
    GARBAGE,
    NODE_AE,
    StoreSCP,
    StowServer,
    associate,
    echo_ok,
    echoscu,
    free_port,
    make_study,
    node_config,
    node_config_file,
    pdu_header,
    raw_connection,
    storescu,
    stub_app,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("MSK_NODE_MODELS", REPO / "models"))

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu, echoscu) not on PATH")


def jobs_of(config: NodeConfig) -> list[dict]:
    return status(config)


def states(config: NodeConfig) -> list[str]:
    return [row["state"] for row in status(config)]


def spool_files(config: NodeConfig, study_uid: str) -> list[Path]:
    return sorted((config.spool_dir / "studies" / study_uid).glob("*.dcm"))


def study_uid_of(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


# -- configuration -----------------------------------------------------------------------

def test_example_config_documents_and_loads_every_key():
    config = NodeConfig.load(REPO / "node.example.yaml")
    assert config.ae_title == "MSKNODE" and config.port == 11112
    assert [d.type for d in config.destinations] == ["cstore", "stow", "folder"]
    assert config.stable_after("PACS") == 120 and config.stable_after("OTHER") == 30
    assert config.spool_dir == REPO / "spool"
    text = (REPO / "node.example.yaml").read_text()
    for key in NodeConfig.__dataclass_fields__:
        assert f"{key}:" in text, key
    assert config.backoff(1) == 10 and config.backoff(3) == 40 and config.backoff(30) == 600


@pytest.mark.parametrize(("change", "key"), [
    ({"port": "eleven"}, "'port'"),
    ({"ae_title": "A" * 17}, "'ae_title'"),
    ({"stable_after_s": -1}, "'stable_after_s'"),
    ({"late_instance_policy": "sometimes"}, "'late_instance_policy'"),
    ({"allowed_calling_aes": "SCU"}, "'allowed_calling_aes'"),
    ({"destinations": [{"type": "cstore", "ae_title": "P", "host": "h"}]}, "'destinations[0].port'"),
    ({"destinations": [{"type": "ftp"}]}, "'destinations[0].type'"),
    ({"destinations": [{"type": "stow", "url": "pacs:8042"}]}, "'destinations[0].url'"),
    ({"destinations": [{"type": "folder", "path": "x", "query_before_resend": "no"}]},
     "'destinations[0].query_before_resend'"),
    ({"destinations": [{"type": "stow", "url": "http://pacs/dicom-web", "storage_commitment": True}]},
     "'destinations[0]' of type stow has unknown key"),
    ({"tls": {"cert": "missing.pem", "key": "missing.key"}}, "'tls.cert'"),
    ({"stable_after_s_by_ae": {"PACS": "slow"}}, "'stable_after_s_by_ae.PACS'"),
    ({"max_attempts": 0}, "'max_attempts'"),
    ({"worker_memory_limit_mb": 0}, "'worker_memory_limit_mb'"),
    ({"max_associations_per_address": 0}, "'max_associations_per_address'"),
    ({"artim_timeout_s": 0}, "'artim_timeout_s'"),
    ({"network_timeout_s": "slow"}, "'network_timeout_s'"),
    ({"colour": "blue"}, "'colour'"),
])
def test_config_errors_name_the_key(tmp_path, change, key):
    document = {"ae_title": "N", "port": 104, "spool_dir": "spool", **change}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        NodeConfig.load(path)
    with pytest.raises(ConfigError, match="'spool_dir' is required"):
        NodeConfig.from_mapping({"ae_title": "N", "port": 104})


# -- association -------------------------------------------------------------------------

def test_echo_succeeds_and_unknown_calling_or_called_ae_is_rejected(tmp_path, nodes, caplog):
    caplog.set_level(logging.INFO)
    config = node_config(tmp_path, None, [], allowed_calling_aes=["SCU", "PACS"])
    node = nodes(config)
    ok = echoscu(node.port, calling="SCU")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stranger = echoscu(node.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Association Rejected" in stranger.stdout + stranger.stderr
    wrong_called = echoscu(node.port, calling="SCU", called="SOMEONE")
    assert wrong_called.returncode != 0
    assert "Association Rejected" in wrong_called.stdout + wrong_called.stderr
    # Each refusal leaves an audit line: why, calling AE, called AE, peer address.
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(refused) == 2, refused
    assert refused[0].startswith("association refused (calling AE title not allowed): calling AE 'STRANGER', "
                                 "called AE 'MSKNODE', from 127.0.0.1:")
    assert refused[1].startswith("association refused (called AE title is not ours): calling AE 'SCU', "
                                 "called AE 'SOMEONE', from 127.0.0.1:")
    # A rejected association stores nothing.
    study = make_study(tmp_path / "study", n=2)
    assert storescu(node.port, [study[0].parent], calling="STRANGER").returncode != 0
    assert jobs_of(config) == []


def _certificates(folder: Path) -> dict[str, Path]:
    """A test CA and node/client certificates signed by it (openssl CLI)."""
    folder.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=msk-node test CA", "-days", "2")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("node", "client"):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: folder / name for name in ("ca.pem", "node.pem", "node.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not on PATH")
def test_tls_listener_requires_a_client_certificate_from_the_ca(tmp_path, nodes):
    certs = _certificates(tmp_path / "certs")
    config = node_config(tmp_path, None, [], tls={"cert": "certs/node.pem", "key": "certs/node.key",
                                                   "ca": "certs/ca.pem"})
    node = nodes(config)
    echo = [shutil.which("echoscu"), "-aet", "SCU", "-aec", NODE_AE]
    trusted = subprocess.run([*echo, "+tls", certs["client.key"], certs["client.pem"], "+cf", certs["ca.pem"],
                              "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    anonymous = subprocess.run([*echo, "+tla", "+cf", certs["ca.pem"], "127.0.0.1", str(node.port)],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    assert echoscu(node.port).returncode != 0  # plain TCP
    # A peer that connects and never starts the handshake does not hold up the others.
    with socket.create_connection(("127.0.0.1", node.port)):
        again = subprocess.run([*echo, "+tls", certs["client.key"], certs["client.pem"], "+cf", certs["ca.pem"],
                                "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr


# -- broken and noisy peers ------------------------------------------------------------------

def test_connections_that_never_associate_do_not_lock_senders_out(tmp_path, nodes, caplog):
    caplog.set_level(logging.INFO)
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [], max_associations=3, artim_timeout_s=1, network_timeout_s=2)
    node = nodes(config)
    # A silent peer is closed by the ARTIM timer; one stuck inside a PDU by the network timeout.
    begin = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", node.port), timeout=10) as stuck:
        stuck.sendall(pdu_header(0x01, 0xFFFFFFFF) + b"\x00" * 64)
        assert silent.recv(64) == b"" and stuck.recv(64) == b""
    assert time.monotonic() - begin < 5
    wait_for(lambda: "closed: no association request within 1 s" in caplog.text, 2,
             what="the silent peer's warning")
    wait_for(lambda: "dropped: Connection closed before the entire PDU was received (TimeoutError" in caplog.text, 2,
             what="the stuck peer's warning")

    # Connect and close, junk, a header claiming 4 GB, resets: three times the slots.
    for payload in GARBAGE.values():
        for reset in (False, True):
            raw_connection(node.port, payload, reset)
    wait_for(lambda: echo_ok(node.port), 2, what="a C-ECHO within 2 s of the junk connections")
    assert echoscu(node.port).returncode == 0
    wait_for(lambda: not node.server.active_associations, 2, what="every slot free")


def test_bursts_of_empty_and_junk_connections_leave_echo_answered_within_a_second(tmp_path, nodes, caplog):
    """20 connections closed without a byte, then 20 junk byte streams, against the default slot count."""
    caplog.set_level(logging.DEBUG)
    node = nodes(node_config(tmp_path, None, []))
    junk = [payload for payload in GARBAGE.values() if payload]
    for burst in ([b""] * 20, [junk[index % len(junk)] for index in range(20)]):
        logged = len(caplog.records)
        for payload in burst:
            raw_connection(node.port, payload)
        wait_for(lambda: echo_ok(node.port), 1, interval=0.05, what="a C-ECHO within 1 s of the burst")
        node_lines = [r for r in caplog.records[logged:] if r.name.startswith("msk_node") and r.levelno >= logging.INFO]
        assert len(node_lines) <= len(burst) + 1, [r.getMessage() for r in node_lines]  # + the echo's own line


def test_one_peer_address_cannot_take_every_slot(tmp_path, nodes, caplog):
    caplog.set_level(logging.INFO)
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [], max_associations=4, max_associations_per_address=2)
    node = nodes(config)
    held = [associate(node.port) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        third = associate(node.port, calling="NOISY")
        assert third.is_rejected
        answer = third.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        assert echo_ok(node.port, source="127.0.0.2")  # another address still gets in
    finally:
        for assoc in held:
            assoc.release()
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and refused[0].startswith(
        "association refused (more than max_associations_per_address=2 from this address): calling AE 'NOISY', "
        "called AE 'MSKNODE', from 127.0.0.1:"), refused

    # Connections that have not associated yet count too: with two silent ones waiting
    # (for the 10 s ARTIM time), a third gets 1 s, and other addresses keep their slots.
    wait_for(lambda: not node.server.active_associations, 5, what="the held associations to end")
    with socket.create_connection(("127.0.0.1", node.port)), socket.create_connection(("127.0.0.1", node.port)):
        wait_for(lambda: len(node.server.active_associations) == 2, 5, what="two waiting connections")
        begin = time.monotonic()
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as extra:
            assert extra.recv(64) == b""
        assert time.monotonic() - begin < 3
        assert echo_ok(node.port, source="127.0.0.2")
        assert not associate(node.port).is_established  # its address is still over the limit


def test_malformed_pdus_leave_one_rate_limited_warning_and_no_traceback(tmp_path, nodes, caplog, capfd):
    caplog.set_level(logging.INFO)
    command, _ = stub_app(tmp_path / "stub")
    node = nodes(node_config(tmp_path, command, []))
    junk = [payload for payload in GARBAGE.values() if payload]
    for index in range(20):
        raw_connection(node.port, junk[index % len(junk)], reset=index % 2 == 1)
    # Accepted after every junk connection (dcmtk: no requestor logs in this process), so
    # none of them is still in the listen queue when the slots are counted.
    wait_for(lambda: echoscu(node.port).returncode == 0, 10, what="a C-ECHO after the junk")
    wait_for(lambda: not node.server.active_associations, 10, what="every junk connection closed")
    assert echoscu(node.port, called="WRONG").returncode != 0  # its audit line is not held back by the junk
    node.stop()  # logs the summary of what the rate limit held back
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    messages = [r.getMessage() for r in warnings]
    assert {r.name for r in warnings} == {"msk_node_service.listener"}, messages
    dropped = [m for m in messages if m.startswith("connection from 127.0.0.1:")]
    summaries = [m for m in messages if re.fullmatch(r"\d+ more warning\(s\) about connections from 127\.0\.0\.1 "
                                                     r"in \d+ s not logged", m)]
    assert len(dropped) == 5 and len(summaries) == 1 and len(messages) <= 8, messages
    assert any(m.startswith("association refused (called AE title is not ours): calling AE 'SCU', called AE 'WRONG'")
               for m in messages), messages
    assert "Traceback" not in caplog.text and "Traceback" not in capfd.readouterr().err

    # The details, tracebacks included, are there at DEBUG.
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="msk_node_service.listener")
    node = nodes(node_config(tmp_path / "again", command, []))
    raw_connection(node.port, GARBAGE["bad A-ASSOCIATE-RQ"])
    wait_for(lambda: "dropped" in caplog.text, 5, what="the warning")
    assert "Traceback" in caplog.text


# -- one study, duplicates, late instances --------------------------------------------------

def test_study_becomes_one_job_delivered_once_and_resend_does_not_duplicate(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    study = make_study(tmp_path / "study", n=5)
    uid = study_uid_of(study)

    sent = storescu(node.port, [study[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(spool_files(config, uid)) == 5  # on disk before storescu heard success
    assert states(config) == ["received"]
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered")
    (job,) = jobs_of(config)
    assert (job["instances"], job["input_instances"], job["attempts"], job["deliveries"]) == (5, 5, 1, 1)
    assert dest.study_uids == [uid]
    assert "from 5 input(s)" in dest.received[0].ImageComments

    # The same instances again: replaced in the spool, no new job, nothing re-sent.
    assert storescu(node.port, [study[0].parent]).returncode == 0
    time.sleep(config.stable_after_s + 1.0)
    assert states(config) == ["delivered"] and len(dest.received) == 1
    assert len(spool_files(config, uid)) == 5
    assert JobStore(config.database).study(uid)["instance_count"] == 5

    # A new instance of the delivered study re-opens it (late_instance_policy: reprocess).
    late = pydicom.dcmread(study[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    assert storescu(node.port, [tmp_path / "late.dcm"]).returncode == 0
    wait_for(lambda: states(config) == ["delivered", "delivered"], 30, what="second job delivered")
    assert jobs_of(config)[1]["input_instances"] == 6
    assert len(dest.received) == 2 and len(spool_files(config, uid)) == 6


def test_spool_jobs_and_results_are_readable_by_the_node_user_only(tmp_path, nodes):
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, None)  # results to the local store <spool_dir>/results
    node = nodes(config)
    assert storescu(node.port, [make_study(tmp_path / "study", n=2)[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered")
    node.stop()
    paths = [config.spool_dir, *config.spool_dir.rglob("*")]
    kinds = {"studies", "jobs", "results", "app.log", "report.json", "node.sqlite"}
    assert kinds <= {path.name for path in paths}, sorted(path.name for path in paths)
    assert len([path for path in paths if path.suffix == ".dcm"]) >= 4  # received, result, delivered copy
    exposed = [f"{path} {stat.filemode(path.stat().st_mode)}" for path in paths
               if path.stat().st_mode & 0o077 or (path.is_file() and path.stat().st_mode & 0o100)]
    assert not exposed


def test_job_store_late_instance_policy_and_recovery(tmp_path):
    store = JobStore(tmp_path / "node.sqlite")
    first = store.record_instance("1.2.3", "1.2.3.1", "SCU", "ignore", now=100.0)
    assert first.opened and not first.duplicate
    assert store.record_instance("1.2.3", "1.2.3.1", "SCU", "ignore", now=101.0).duplicate
    assert store.study("1.2.3")["instance_count"] == 1
    assert store.mark_stable(first.job_id, last_received=101.0)
    store.record_instance("1.2.3", "1.2.3.2", "SCU", "ignore", now=102.0)  # still queued: back to received
    assert store.job(first.job_id).state == "received"
    assert store.mark_stable(first.job_id, last_received=102.0)
    assert store.start_attempt(first.job_id, "out").state == "running"
    ignored = store.record_instance("1.2.3", "1.2.3.3", "SCU", "ignore", now=103.0)
    assert ignored.job_id is None and len(store.jobs()) == 1
    reopened = store.record_instance("1.2.3", "1.2.3.4", "SCU", "reprocess", now=104.0)
    assert reopened.opened and len(store.jobs()) == 2

    assert store.recover(max_attempts=3) == [first.job_id]  # the node was killed mid-run
    assert store.job(first.job_id).state == "stable" and store.job(first.job_id).attempts == 1
    store.start_attempt(first.job_id, "out")
    assert store.recover(max_attempts=2) == [first.job_id]
    assert store.job(first.job_id).state == "dead" and "interrupted" in store.job(first.job_id).reason
    with pytest.raises(ValueError, match="received"):
        store.requeue(reopened.job_id)
    with pytest.raises(KeyError):
        store.requeue(99)
    store.close()


def test_studies_become_stable_after_their_calling_aes_timeout(tmp_path):
    from msk_node_service.worker import Worker

    config = node_config(tmp_path, None, [], stable_after_s=2, stable_after_s_by_ae={"SLOWPACS": 60})
    store = JobStore(config.database)
    worker = Worker(config, Spool(config.spool_dir), store)
    fast = store.record_instance("1.2.1", "1.2.1.1", "MODALITY", "reprocess", now=1000.0)
    slow = store.record_instance("1.2.2", "1.2.2.1", "SLOWPACS", "reprocess", now=1000.0)
    assert worker.promote_stable(now=1001.0) == []
    assert worker.promote_stable(now=1002.5) == [fast.job_id]
    assert worker.promote_stable(now=1059.0) == []
    assert worker.promote_stable(now=1060.5) == [slow.job_id]
    store.close()


# -- load --------------------------------------------------------------------------------

def test_four_concurrent_associations_of_three_studies_each(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    senders = []
    for s in range(4):
        studies = [make_study(tmp_path / f"sender{s}" / f"study{k}", n=4 + k) for k in range(3)]
        senders.append(studies)
    results: list[subprocess.CompletedProcess] = []

    def send(index, studies):
        results.append(storescu(node.port, [paths[0].parent for paths in studies], calling=f"SCU{index}"))

    threads = [threading.Thread(target=send, args=item) for item in enumerate(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]

    expected = {study_uid_of(paths): len(paths) for studies in senders for paths in studies}
    assert len(expected) == 12
    wait_for(lambda: states(config) == ["delivered"] * 12, 120, what="12 delivered jobs")
    rows = jobs_of(config)
    assert {row["study_uid"]: row["instances"] for row in rows} == expected
    assert all(row["input_instances"] == row["instances"] for row in rows)
    assert {uid: len(spool_files(config, uid)) for uid in expected} == expected
    assert sorted(dest.study_uids) == sorted(expected)  # one result per study, none twice


# -- failures ----------------------------------------------------------------------------

def test_crashing_app_is_retried_then_dead_and_the_operator_can_retry_it(tmp_path, nodes, dest, capsys):
    command, mode = stub_app(tmp_path / "stub", "crash")
    config_path = tmp_path / "node.yaml"
    document = {"ae_title": NODE_AE, "port": 0, "spool_dir": "spool", "stable_after_s": 1, "poll_interval_s": 0.1,
                "retry_backoff_s": 0.3, "max_retry_backoff_s": 1, "max_attempts": 2, "app_command": command,
                "destinations": [dest.destination()], "preselect_series": False}
    config_path.write_text(yaml.safe_dump(document))
    config = NodeConfig.load(config_path)
    node = nodes(config)
    crashing = make_study(tmp_path / "crashing", n=3)
    assert storescu(node.port, [crashing[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["dead"], 60, what="dead job")
    (job,) = jobs_of(config)
    assert job["attempts"] == 2
    assert "exit code 1" in job["reason"] and "stub application crashed on purpose" in job["reason"]
    assert dest.received == []

    # The node keeps serving.
    assert echoscu(node.port).returncode == 0
    mode.write_text("copy")
    healthy = make_study(tmp_path / "healthy", n=3)
    assert storescu(node.port, [healthy[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["dead", "delivered"], 30, what="second study delivered")

    assert cli.main(["status", "--config", str(config_path)]) == 0
    table = capsys.readouterr().out
    assert "dead" in table and "stub application crashed on purpose" in table and study_uid_of(crashing) in table
    assert cli.main(["retry", str(job["id"]), "--config", str(config_path)]) == 0
    assert "stable" in capsys.readouterr().out
    wait_for(lambda: states(config) == ["delivered", "delivered"], 30, what="retried job delivered")
    assert sorted(dest.study_uids) == sorted([study_uid_of(crashing), study_uid_of(healthy)])
    # A delivered job runs again when asked (new results, delivered anew); an unknown job is refused.
    assert cli.main(["retry", str(job["id"]), "--config", str(config_path)]) == 0
    assert "stable" in capsys.readouterr().out
    wait_for(lambda: states(config) == ["delivered", "delivered"] and len(dest.study_uids) == 3, 30,
             what="delivered job run again")
    with pytest.raises(SystemExit, match="no job 99"):
        cli.main(["retry", "99", "--config", str(config_path)])


def test_app_that_hangs_is_killed_at_the_job_timeout(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub", "sleep:30")
    config = node_config(tmp_path, command, [dest.destination()], job_timeout_s=1, max_attempts=1)
    node = nodes(config)
    study = make_study(tmp_path / "study", n=2)
    assert storescu(node.port, [study[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["dead"], 30, what="dead job")
    assert jobs_of(config)[0]["reason"] == "timed out after 1 s"


def test_killed_node_resumes_the_job_and_delivers_exactly_once(tmp_path, nodes, dest):
    command, mode = stub_app(tmp_path / "stub", "sleep:60")
    config_path = tmp_path / "node.yaml"
    port = free_port()
    document = {"ae_title": NODE_AE, "port": port, "spool_dir": "spool", "stable_after_s": 1, "poll_interval_s": 0.1,
                "retry_backoff_s": 0.2, "app_command": command, "destinations": [dest.destination()],
                "preselect_series": False}
    config_path.write_text(yaml.safe_dump(document))
    config = NodeConfig.load(config_path)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "msk_node.cli", "serve", "--config", str(config_path)],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: echoscu(port).returncode == 0, 60, interval=0.5, what="serve to listen")
        study = make_study(tmp_path / "study", n=4)
        assert storescu(port, [study[0].parent]).returncode == 0
        wait_for(lambda: states(config) == ["running"], 30, what="running job")
        app = wait_for(lambda: AppPidFile(config.spool_dir / "app.pid").read(), 10, what="the pid file")
        assert app["job"] == 1 and "stub_app.py" in " ".join(psutil.Process(app["pid"]).cmdline())
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the node's group; the application has a group of its own
        server.wait(30)
        log.close()
    assert states(config) == ["running"]
    assert _alive(app["pid"])  # left running by the crashed node

    mode.write_text("copy")
    node = nodes(config)
    wait_for(lambda: not _alive(app["pid"]), 5, what="the leftover application ended")
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered after restart")
    assert dest.study_uids == [study_uid_of(study)]
    (job,) = jobs_of(config)
    assert job["attempts"] == 2 and job["input_instances"] == 4
    assert job["history"] == [f"application process {app['pid']} left running by the previous node was ended",
                              "interrupted by a node restart; will run again"]

    # Another restart sends nothing again.
    node.stop()
    nodes(config)
    time.sleep(1.0)
    assert len(dest.received) == 1 and states(config) == ["delivered"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_pid_file_never_ends_a_process_that_reuses_the_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pid_file = AppPidFile(tmp_path / "app.pid")
        pid_file.record(sleeper.pid, 7)
        record = pid_file.read()
        assert record == {"pid": sleeper.pid, "start": process_start(sleeper.pid), "job": 7}
        # The same pid, another start time: the recorded process is gone, this one is not ours.
        pid_file.path.write_text(json.dumps({**record, "start": record["start"] - 1}))
        assert pid_file.end_leftover() is None
        assert sleeper.poll() is None and not pid_file.path.exists()
        pid_file.record(sleeper.pid, 7)
        assert pid_file.end_leftover() == record
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_ends_the_application_with_everything_it_started(tmp_path, nodes, dest):
    # A one-shot application that starts a child of its own and waits for it.
    command = ["/bin/sh", "-c", "sleep 300 & echo $! > child.pid; wait", "app"]
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    assert storescu(node.port, [make_study(tmp_path / "study", n=2)[0].parent]).returncode == 0
    child_pid_file = config.spool_dir / "jobs" / "1" / "attempt-1" / "child.pid"
    wait_for(lambda: child_pid_file.is_file() and child_pid_file.read_text().strip(), 30, what="the app's child")
    app_pid = AppPidFile(config.spool_dir / "app.pid").read()["pid"]
    child_pid = int(child_pid_file.read_text())
    assert os.getpgid(app_pid) == app_pid != os.getpgid(0) and os.getpgid(child_pid) == app_pid
    node.stop()
    wait_for(lambda: not _alive(app_pid) and not _alive(child_pid), 5, what="the application's group ended")
    assert not (config.spool_dir / "app.pid").exists()
    assert [(job["state"], job["attempts"]) for job in jobs_of(config)] == [("stable", 0)]


def test_stopped_node_returns_the_running_job_to_the_queue(tmp_path, nodes, dest):
    command, mode = stub_app(tmp_path / "stub", "sleep:60")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    study = make_study(tmp_path / "study", n=2)
    assert storescu(node.port, [study[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["running"], 30, what="running job")
    node.stop()
    (job,) = jobs_of(config)
    assert (job["state"], job["attempts"]) == ("stable", 0)
    mode.write_text("copy")
    nodes(config)
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered after restart")
    assert len(dest.received) == 1


def test_destination_down_then_up_gets_the_result_once(tmp_path, nodes):
    command, _ = stub_app(tmp_path / "stub")
    port = free_port()
    destination = {"type": "cstore", "ae_title": "LATE", "host": "127.0.0.1", "port": port}
    config = node_config(tmp_path, command, [destination])
    node = nodes(config)
    study = make_study(tmp_path / "study", n=3)
    assert storescu(node.port, [study[0].parent]).returncode == 0
    wait_for(lambda: any(row["delivery_tries"] >= 2 for row in jobs_of(config)), 30, what="failed deliveries")
    (job,) = jobs_of(config)
    assert job["state"] == "delivering" and "delivery pending" in job["reason"] and f":{port}" in job["reason"]

    late = StoreSCP("LATE", port=port)
    try:
        wait_for(lambda: states(config) == ["delivered"], 30, what="delivered once the destination is up")
        time.sleep(1.0)
        assert late.study_uids == [study_uid_of(study)]
    finally:
        late.stop()


def test_stow_rs_and_folder_destinations(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub")
    stow = StowServer()
    try:
        config = node_config(tmp_path, command, [dest.destination(), {"type": "stow", "url": stow.url},
                                                 {"type": "folder", "path": "local-store"}])
        node = nodes(config)
        study = make_study(tmp_path / "study", n=3)
        uid = study_uid_of(study)
        assert storescu(node.port, [study[0].parent]).returncode == 0
        wait_for(lambda: states(config) == ["delivered"], 30, what="delivered")
        (sop,) = dest.sop_uids
        assert stow.requests == ["/dicom-web/studies"] and len(stow.parts) == 1
        assert str(pydicom.dcmread(io.BytesIO(stow.parts[0])).SOPInstanceUID) == sop
        assert [p.name for p in (tmp_path / "local-store" / uid).iterdir()] == [f"{sop}.dcm"]
        assert jobs_of(config)[0]["deliveries"] == 3
    finally:
        stow.stop()


def test_stow_rs_sender_confirms_each_instance_and_reports_http_and_connection_errors(tmp_path):
    from msk_node_service.config import Destination
    from msk_node_service.delivery import DeliveryError, read_results, send_stow

    make_study(tmp_path / "results", n=2)
    results, problems = read_results(tmp_path / "results")
    assert len(results) == 2 and problems == []
    stow = StowServer()
    try:
        confirmed: list[str] = []
        send_stow(Destination("stow", url=stow.url), results, confirmed.append)
        assert confirmed == [r.sop_uid for r in results] and len(stow.parts) == 2
        with pytest.raises(DeliveryError, match="HTTP 404"):
            send_stow(Destination("stow", url=stow.url + "/wrong"), results, confirmed.append)
    finally:
        stow.stop()
    with pytest.raises(DeliveryError, match="STOW-RS to"):  # nobody listening
        send_stow(Destination("stow", url=stow.url), results, confirmed.append)


# -- studies that are not processed: skipped, held; association health ---------------------

def _non_msk_studies(folder: Path, count: int) -> list[Path]:
    """Studies the series-selection rules take nothing from: CT of the knee, axial brain MR, and
    sagittal PD series too short for a volume; each 2 instances. Returns their folders."""
    folders = []
    for index in range(count):
        kind = ("ct", "brain", "short")[index % 3]
        study = make_study(folder / f"{kind}-{index}", n=2, description={
            "ct": "CT knee", "brain": "Ax T2 FLAIR brain", "short": "sag PD knee"}[kind])
        for path in study:
            ds = pydicom.dcmread(path)
            if kind == "ct":
                ds.Modality, ds.BodyPartExamined = "CT", "KNEE"
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            elif kind == "brain":
                ds.BodyPartExamined, ds.ImageOrientationPatient = "HEAD", [1, 0, 0, 0, 1, 0]
            ds.save_as(path, enforce_file_format=True)
        folders.append(study[0].parent)
    return folders


def test_judge_study_applies_the_selection_rules_to_headers_and_never_skips_what_it_cannot_read(tmp_path):
    from msk_node_phantoms import write_phantom
    from msk_node.selection import load_rules
    from msk_node_service.triage import judge_study

    rules = load_rules()
    (ct,) = _non_msk_studies(tmp_path / "ct", 1)
    verdict = judge_study(sorted(ct.glob("*.dcm")), rules)
    assert verdict.selectable is False and verdict.modalities == ("CT",)
    assert verdict.reason == "no series matches the MSK selection rules: 1 series (CT 'CT knee')"
    knee = sorted(write_phantom("knee", tmp_path / "knee", seed=3, n_slices=8).rglob("*.dcm"))
    assert judge_study(knee + sorted(ct.glob("*.dcm")), rules).selectable is True
    (tmp_path / "garbage.dcm").write_bytes(b"not DICOM at all")
    unreadable = judge_study([*sorted(ct.glob("*.dcm")), tmp_path / "garbage.dcm"], rules)
    assert unreadable.selectable is None and "garbage.dcm unreadable" in unreadable.reason
    assert judge_study([], rules).selectable is None


def test_msk_study_runs_first_when_ten_studies_without_msk_series_arrived_before_it(tmp_path, nodes, dest, caplog):
    from msk_node_phantoms import write_phantom

    caplog.set_level(logging.INFO, logger="msk_node_service")
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()], preselect_series=True)
    node = nodes(config)
    others = _non_msk_studies(tmp_path / "others", 10)
    knee = write_phantom("knee", tmp_path / "knee", seed=3, n_slices=8) / "dicom"
    assert storescu(node.port, others).returncode == 0
    assert storescu(node.port, [knee]).returncode == 0
    wait_for(lambda: states(config) == ["skipped"] * 10 + ["delivered"], 60, what="10 skipped, the knee delivered")

    *skipped, msk = jobs_of(config)
    assert msk["study_uid"] == study_uid_of(sorted(knee.rglob("*.dcm"))) and msk["attempts"] == 1
    assert dest.study_uids == [msk["study_uid"]]
    # One application start in all: the only attempt folder is the knee's.
    assert sorted(path.relative_to(config.spool_dir / "jobs").as_posix()
                  for path in (config.spool_dir / "jobs").glob("*/attempt-*")) == [f"{msk['id']}/attempt-1"]
    assert max(job["finished"] for job in skipped) <= msk["started"]
    for job in skipped:
        assert job["attempts"] == 0 and job["output_dir"] is None
        assert re.fullmatch(r"no series matches the MSK selection rules: 1 series \((CT 'CT knee'|MR 'Ax T2 FLAIR "
                            r"brain'|MR 'sag PD knee')\)", job["reason"]), job["reason"]
        assert job["history"] == [f"skipped: {job['reason']}"]
        audit = f"job {job['id']}: study {job['study_uid']} skipped, nothing to segment: 1 series "
        assert audit + "(CT)" in caplog.text or audit + "(MR)" in caplog.text
    assert "Test^Knee" not in caplog.text and "MSK0001" not in caplog.text

    # A skipped study that grows gets judged again (a knee series sent after the CT).
    late = make_study(tmp_path / "late", n=8, description="sag PD knee")
    for path in late:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = skipped[0]["study_uid"]
        ds.save_as(path, enforce_file_format=True)
    assert storescu(node.port, [late[0].parent]).returncode == 0
    wait_for(lambda: states(config)[0] == "delivered", 30, what="the grown study delivered")
    grown = jobs_of(config)[0]
    assert grown["input_instances"] == 10 and "re-opened: an instance arrived while it was skipped" in grown["history"]


def test_study_with_instances_refused_for_lack_of_space_is_held_until_resent_or_released(tmp_path, nodes, dest,
                                                                                          monkeypatch, capsys):
    command, _ = stub_app(tmp_path / "stub")
    config_path = node_config_file(tmp_path, command, [dest.destination()])
    config = NodeConfig.load(config_path)
    node = nodes(config)
    write = Spool.write_instance
    refused: set[str] = set()

    def disk_full_for_some(self, ds):
        if str(ds.SOPInstanceUID) in refused:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, ds)

    monkeypatch.setattr(Spool, "write_instance", disk_full_for_some)
    first = [pydicom.dcmread(path) for path in make_study(tmp_path / "first", n=4)]
    second = [pydicom.dcmread(path) for path in make_study(tmp_path / "second", n=3)]
    refused.update({str(first[1].SOPInstanceUID), str(first[2].SOPInstanceUID), str(second[0].SOPInstanceUID)})
    assert _send_with_pynetdicom(node.port, first) == [0x0000, OUT_OF_RESOURCES, OUT_OF_RESOURCES, 0x0000]
    assert _send_with_pynetdicom(node.port, second) == [OUT_OF_RESOURCES, 0x0000, 0x0000]
    wait_for(lambda: states(config) == ["held", "held"], 30, what="both studies held")
    held = jobs_of(config)
    assert held[0]["reason"] == ("2 instance(s) refused for lack of space; held until the sender re-sends them "
                                 "or an operator releases the job")
    assert held[1]["reason"].startswith("1 instance(s) refused for lack of space;")
    assert dest.received == [] and not list((config.spool_dir / "jobs").iterdir())

    assert cli.main(["status", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^1 +\S+ +held +0 +2 instance\(s\) refused for lack of space", out, re.MULTILINE), out
    assert f"      held: {held[0]['reason']}" in out

    # The operator releases the first: it runs without its two missing instances.
    assert cli.main(["release", "1", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out.strip() == "job 1: stable (runs without 2 refused instance(s))"
    wait_for(lambda: states(config)[0] == "delivered", 30, what="the released job delivered")
    released = jobs_of(config)[0]
    assert released["input_instances"] == 2 and "from 2 input(s)" in dest.received[0].ImageComments
    assert released["history"][-1] == "released by the operator with 2 refused instance(s) missing"
    with pytest.raises(SystemExit, match="job 1 is delivered; only held jobs can be released"):
        cli.main(["release", "1", "--config", str(config_path)])

    # The sender re-sends what was refused to the second: it runs, complete, with no one's help.
    refused.clear()
    assert _send_with_pynetdicom(node.port, second[:1]) == [0x0000]
    wait_for(lambda: states(config) == ["delivered", "delivered"], 30, what="the re-sent study delivered")
    resent = jobs_of(config)[1]
    assert resent["input_instances"] == 3 and resent["attempts"] == 1
    assert resent["history"] == [f"held: {held[1]['reason']}", "re-opened: an instance arrived while it was held"]


def test_status_shows_how_associations_ended_since_the_node_started(tmp_path, nodes, capsys):
    config_path = node_config_file(tmp_path, None, [], allowed_calling_aes=["SCU"])
    config = NodeConfig.load(config_path)
    node = nodes(config)
    assert echoscu(node.port, calling="STRANGER").returncode != 0
    assert echoscu(node.port, calling="SCU").returncode == 0
    expected = {"accepted": {"": 1}, "refused": {"calling AE unknown": 1}}
    wait_for(lambda: association_health(config)["counts"] == expected, 5, what="both associations counted")

    assert cli.main(["status", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^associations since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(MSKNODE, running\): 1 accepted; "
                     r"1 refused \(calling AE unknown 1\); 0 aborted; 0 dropped$", out, re.MULTILINE), out
    assert cli.main(["status", "--json", "--config", str(config_path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["jobs"] == [] and document["associations"]["counts"] == expected

    # Counts start again with the next node run; the last one's end is recorded.
    node.stop()
    assert association_health(config)["stopped"] is not None
    node = nodes(config)
    assert echoscu(node.port, calling="SCU", called="OTHER").returncode != 0
    aborted = associate(node.port)
    assert aborted.is_established
    aborted.abort()
    raw_connection(node.port, GARBAGE["http"])
    raw_connection(node.port)
    expected = {"accepted": {"": 1}, "aborted": {"": 1}, "refused": {"called AE wrong": 1},
                "dropped": {"protocol error": 1, "closed before a request": 1}}
    wait_for(lambda: association_health(config)["counts"] == expected, 5, what="the new run's counts")
# -- delivery across a crash ---------------------------------------------------------------

class DicomWebServer:
    """STOW-RS into a set of held instances and QIDO-RS of them by SOP Instance UID.

    Parameters
    ----------
    qido_status : int
        200 answers queries; anything else refuses them with that status.
    """

    def __init__(self, qido_status: int = 200) -> None:
        self.held: dict[str, str] = {}      # SOP Instance UID -> Study Instance UID
        self.stored: list[str] = []         # every instance POSTed, repeats included
        self.queries: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, document: object) -> None:
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                url = urllib.parse.urlsplit(self.path)
                study = re.fullmatch(r"/dicom-web/studies/([0-9.]+)/instances", url.path)[1]
                (sop,) = urllib.parse.parse_qs(url.query)["SOPInstanceUID"]
                owner.queries.append(sop)
                if qido_status != 200:
                    self._answer(qido_status, {})
                    return
                match = owner.held.get(sop) == study
                self._answer(200, [{"00080018": {"vr": "UI", "Value": [sop]}}] if match else [])

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                for part in body.split(b"--" + boundary)[1:-1]:
                    ds = pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2]))
                    owner.held[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
                    owner.stored.append(str(ds.SOPInstanceUID))
                self._answer(200, {})

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class QueryStoreSCP:
    """A C-STORE destination that answers Study Root C-FIND at IMAGE level about what it holds,
    or, with ``answers_find`` False, accepts no Query/Retrieve context."""

    def __init__(self, answers_find: bool) -> None:
        self.stored: list[str] = []         # every instance received, repeats included
        self.queries: list[str] = []
        self.held: dict[str, str] = {}
        ae = AE(ae_title="QDEST")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        if answers_find:
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_FIND, self._on_find)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.dataset.SOPInstanceUID))
        self.held[str(event.dataset.SOPInstanceUID)] = str(event.dataset.StudyInstanceUID)
        return 0x0000

    def _on_find(self, event: evt.Event):
        query = event.identifier
        self.queries.append(str(query.SOPInstanceUID))
        if query.QueryRetrieveLevel == "IMAGE" and self.held.get(query.SOPInstanceUID) == query.StudyInstanceUID:
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID, match.SOPInstanceUID = query.StudyInstanceUID, query.SOPInstanceUID
            yield 0xFF00, match

    def destination(self) -> dict:
        return {"type": "cstore", "ae_title": "QDEST", "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.server.shutdown()


def _delivering_job(tmp_path: Path, destination: dict, n: int = 2):
    """A job whose application wrote ``n`` results, now ``delivering``; returns its (unstarted)
    worker, the job, the results and the destination's key."""
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [destination])
    store = JobStore(config.database)
    output = tmp_path / "output"
    make_study(output, n=n)
    job_id = store.record_instance(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "SCU", "reprocess").job_id
    assert store.mark_stable(job_id, time.time() + 1)
    store.start_attempt(job_id, str(output))
    assert store.finish_attempt(job_id, True, "1 result(s)", 3, 0) == "delivering"
    results, _ = read_results(output)
    return Worker(config, Spool(config.spool_dir), store), store.job(job_id), results, config.destinations[0].key


@pytest.mark.parametrize("answers_find", [True, False])
def test_unconfirmed_cstore_result_is_looked_up_with_c_find_or_sent_again(tmp_path, answers_find):
    scp = QueryStoreSCP(answers_find)
    try:
        worker, job, (first, second), key = _delivering_job(tmp_path, scp.destination())
        # The first result reached the destination; the node died before recording the confirmation.
        worker.store.record_sending(job.id, key, [first.sop_uid])
        send_cstore(worker.config.destinations[0], [first], lambda sop_uid: None, NODE_AE)
        assert worker.store.in_doubt(job.id, key) == {first.sop_uid} and worker.store.delivered(job.id, key) == set()

        assert worker.deliver(job) == "delivered"
        history = worker.store.history(job.id)
        if answers_find:
            assert scp.queries == [first.sop_uid] and scp.stored == [first.sop_uid, second.sop_uid]
            assert history == [f"{first.sop_uid} found at {key}, not re-sent"]
        else:  # at-least-once: sent again, and said why
            assert scp.queries == [] and scp.stored == [first.sop_uid, first.sop_uid, second.sop_uid]
            assert history == [f"{key} cannot say which results it holds ({key[7:]} rejected a Study Root C-FIND "
                               "association); unconfirmed ones are re-sent"]
        assert worker.store.delivered(job.id, key) == {first.sop_uid, second.sop_uid}
        assert worker.store.in_doubt(job.id, key) == set()
    finally:
        scp.stop()


def test_unreachable_destination_keeps_unconfirmed_results_in_doubt(tmp_path):
    destination = {"type": "cstore", "ae_title": "GONE", "host": "127.0.0.1", "port": free_port()}
    worker, job, results, key = _delivering_job(tmp_path, destination, n=1)
    worker.store.record_sending(job.id, key, [results[0].sop_uid])
    assert worker.deliver(job) == "delivering"
    assert "C-FIND association with GONE" in worker.store.job(job.id).reason
    assert worker.store.in_doubt(job.id, key) == {results[0].sop_uid} and worker.store.history(job.id) == []


@pytest.mark.parametrize("qido_status", [200, 400, 503])
def test_unconfirmed_stow_results_are_looked_up_with_qido_or_sent_again(tmp_path, qido_status):
    web = DicomWebServer(qido_status)
    try:
        worker, job, (first, second), key = _delivering_job(tmp_path, {"type": "stow", "url": web.url})
        # The POST of both left, the node died; only the first had reached the destination.
        worker.store.record_sending(job.id, key, [first.sop_uid, second.sop_uid])
        web.held[first.sop_uid] = first.study_uid

        assert worker.deliver(job) == "delivered"
        history = worker.store.history(job.id)
        if qido_status == 200:
            assert web.queries == [first.sop_uid, second.sop_uid] and web.stored == [second.sop_uid]
            assert history == [f"{first.sop_uid} found at {key}, not re-sent"]
        else:
            assert web.queries == [first.sop_uid] and web.stored == [first.sop_uid, second.sop_uid]
            assert history == [f"{key} cannot say which results it holds (QIDO-RS to {web.url}: HTTP {qido_status}); "
                               "unconfirmed ones are re-sent"]
        assert worker.store.delivered(job.id, key) == {first.sop_uid, second.sop_uid}
    finally:
        web.stop()


@pytest.mark.parametrize("query", [True, False])
def test_unconfirmed_folder_result_is_found_by_its_file_name_unless_the_query_is_off(tmp_path, query):
    destination = {"type": "folder", "path": "store", "query_before_resend": query}
    worker, job, (result,), key = _delivering_job(tmp_path, destination, n=1)
    worker.store.record_sending(job.id, key, [result.sop_uid])
    target = stored_path(worker.config.destinations[0], result)
    target.parent.mkdir(parents=True)
    shutil.copyfile(result.path, target)
    copied = target.stat().st_ino

    assert worker.deliver(job) == "delivered"
    assert (target.stat().st_ino == copied) == query  # a copy replaces the file (a new inode)
    found = [f"{result.sop_uid} found at {key}, not re-sent"]
    assert worker.store.history(job.id) == (found if query else [])
    assert worker.store.delivered(job.id, key) == {result.sop_uid}


def test_storage_commitment_the_destination_does_not_offer_is_noted_and_delivery_completes(tmp_path):
    scp = QueryStoreSCP(answers_find=False)
    try:
        worker, job, (result,), key = _delivering_job(tmp_path, {**scp.destination(), "storage_commitment": True}, n=1)
        assert worker.deliver(job) == "delivered"
        assert scp.stored == [result.sop_uid]
        assert worker.store.history(job.id) == [
            f"storage commitment not requested from {key}: {key[7:]} does not offer Storage Commitment"]
        assert worker.store.commitments(job.id, key) == {result.sop_uid: "requested"}
        assert worker.store.record_commitment_report(pydicom.uid.generate_uid(), [result.sop_uid], []) is None
    finally:
        scp.stop()


# -- what is stored ------------------------------------------------------------------------

def _send_with_pynetdicom(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="SCU")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _encoded(tmp_path: Path, syntax: str) -> pydicom.Dataset:
    (path,) = make_study(tmp_path / syntax, n=1, size=64)
    ds = pydicom.dcmread(path)
    ds.BitsStored = ds.BitsAllocated = 16
    ds.HighBit = 15
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax in (JPEGBaseline8Bit, JPEGLSLossless, JPEG2000):
        # The listener stores pixel data as received, so opaque fragments are enough here.
        ds.PixelData = encapsulate([b"\xff\xd8 fragment of " + syntax.encode() + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:  # write and read back so the dataset's encoding matches the transfer syntax
        ds.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    return ds


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEG2000Lossless, JPEG2000, JPEGBaseline8Bit, JPEGLSLossless])
def test_instances_are_stored_in_the_transfer_syntax_they_arrived_in(tmp_path, nodes, syntax):
    config = node_config(tmp_path, None, [], stable_after_s=600)
    node = nodes(config)
    ds = _encoded(tmp_path, syntax)
    assert _send_with_pynetdicom(node.port, [ds]) == [0x0000]
    (stored,) = spool_files(config, str(ds.StudyInstanceUID))
    back = pydicom.dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    assert list((config.spool_dir / "tmp").iterdir()) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_store_answers_failure_statuses(tmp_path, nodes, monkeypatch):
    config = node_config(tmp_path, None, [], stable_after_s=600)
    node = nodes(config)
    (path,) = make_study(tmp_path / "s", n=1)
    bad_uid = pydicom.dcmread(path)
    bad_uid.StudyInstanceUID = "../../etc"  # would escape the spool as a folder name
    assert _send_with_pynetdicom(node.port, [bad_uid]) == [CANNOT_UNDERSTAND]

    def disk_full(self, ds):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "write_instance", disk_full)
    assert _send_with_pynetdicom(node.port, [pydicom.dcmread(path)]) == [OUT_OF_RESOURCES]
    assert jobs_of(config) == []


def test_corrupt_instance_is_kept_and_the_job_still_runs(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    study = make_study(tmp_path / "study", n=4)
    corrupt = pydicom.dcmread(study[1])
    corrupt.PixelData = corrupt.PixelData[:100]  # truncated pixel data: stored, not decodable
    assert storescu(node.port, [study[0], study[2], study[3]]).returncode == 0
    assert _send_with_pynetdicom(node.port, [corrupt]) == [0x0000]
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered")
    (job,) = jobs_of(config)
    assert job["instances"] == job["input_instances"] == 4
    assert "from 4 input(s)" in dest.received[0].ImageComments
    assert "1 input(s) skipped" in job["reason"]


def test_info_logs_carry_no_patient_identifiers(tmp_path, nodes, dest, caplog):
    caplog.set_level(logging.INFO)
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    study = make_study(tmp_path / "study", n=3, patient_name="Zebulon^Quixotic", patient_id="PID-98765-XQ")
    assert storescu(node.port, [study[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["delivered"], 30, what="delivered")
    text = caplog.text
    assert study_uid_of(study) in text and "delivered" in text
    for identifier in ("Zebulon", "Quixotic", "PID-98765-XQ"):
        assert identifier not in text


# -- the warm worker and the real application ----------------------------------------------

needs_models = pytest.mark.skipif(not (MODELS / "detector" / "manifest.yaml").is_file()
                                  or not (MODELS / "segmenter" / "manifest.yaml").is_file(),
                                  reason=f"default models not found under {MODELS}")


def _phantom_study(tmp_path: Path, kind: str, seed: int = 7) -> Path:
    """A 4-slice phantom: a thigh is segmented (seconds of work), a knee is too short to segment (instant)."""
    from msk_node_phantoms import write_phantom

    return write_phantom(kind, tmp_path / f"{kind}-{seed}", seed=seed, n_slices=4) / "dicom"


def test_warm_worker_reports_why_the_models_did_not_load(tmp_path):
    from msk_node_service.app_worker import WarmApp

    result = WarmApp(tmp_path / "no-models").run(tmp_path, tmp_path, tmp_path / "app.log", 60, lambda: False)
    assert not result.ok
    assert result.reason == (f"model load failed: ModelError: models folder not found: {tmp_path / 'no-models'}; "
                             "pass the models folder with -m MODELS (the node: models_dir in its config) "
                             "or set MSK_NODE_MODELS")


@needs_models
def test_killed_warm_worker_fails_one_attempt_and_a_fresh_one_serves_the_next_studies(tmp_path, nodes, dest,
                                                                                        caplog):
    caplog.set_level(logging.INFO, logger="msk_node_service")
    thigh, knee = _phantom_study(tmp_path, "thigh"), _phantom_study(tmp_path, "knee")
    config = node_config(tmp_path, None, [dest.destination()], models_dir=str(MODELS), max_attempts=2,
                         job_timeout_s=600)
    node = nodes(config)
    assert storescu(node.port, [thigh]).returncode == 0
    # app.log appears when the warm worker takes the study.
    wait_for((config.spool_dir / "jobs" / "1" / "attempt-1" / "app.log").is_file, 120, what="the study started")
    killed_pid = node.worker.app.pid
    os.kill(killed_pid, signal.SIGKILL)
    assert storescu(node.port, [knee]).returncode == 0
    wait_for(lambda: states(config) == ["delivered", "delivered"], 600, interval=0.5, what="both delivered")

    retried, second = jobs_of(config)
    assert (retried["attempts"], second["attempts"]) == (2, 1)
    assert "series: segmented 1" in retried["reason"]
    assert set(dest.study_uids) == {study_uid_of(sorted(thigh.rglob("*.dcm")))}  # the knee has no result
    messages = [record.getMessage() for record in caplog.records]
    failures = [m for m in messages if "failed after" in m]
    assert len(failures) == 1 and failures[0].endswith(": worker killed by signal 9"), failures
    # Two warm workers in all, the second serving the retry and the next study: no model load per study.
    assert len([m for m in messages if "ready: models loaded" in m]) == 2
    assert node.worker.app.pid not in (None, killed_pid)


@needs_models
def test_warm_worker_left_by_a_crashed_node_is_ended_by_the_next(tmp_path, nodes, caplog):
    caplog.set_level(logging.INFO, logger="msk_node_service")
    from msk_node_service.app_worker import WarmApp

    config = node_config(tmp_path, None, [], models_dir=str(MODELS))
    config.spool_dir.mkdir()
    # The warm worker of a node that died without stopping it.
    left = WarmApp(MODELS, pid_file=AppPidFile(config.spool_dir / "app.pid"))
    try:
        assert left.start(timeout_s=600)
        pid = left.pid
        assert os.getpgid(pid) == pid != os.getpgid(0)  # a process group of its own
        node = nodes(config)
        wait_for(lambda: not _alive(pid), 5, what="the leftover warm worker ended")
        assert f"application process {pid} left running by the previous node was ended (no job)" in caplog.text
        wait_for(lambda: node.worker.app.ready, 600, what="the new warm worker")
        assert AppPidFile(config.spool_dir / "app.pid").read()["pid"] == node.worker.app.pid != pid
    finally:
        left.stop()


@needs_models
def test_warm_worker_over_its_memory_limit_fails_the_attempt_and_a_fresh_one_takes_the_next_study(tmp_path, nodes,
                                                                                                   dest):
    config = node_config(tmp_path, None, [dest.destination()], models_dir=str(MODELS), worker_memory_limit_mb=1,
                         max_attempts=1, job_timeout_s=600)
    node = nodes(config)
    assert storescu(node.port, [_phantom_study(tmp_path, "thigh")]).returncode == 0
    wait_for(lambda: states(config) == ["dead"], 120, what="dead job")
    assert jobs_of(config)[0]["reason"] == "worker exceeded memory limit of 1 MB"

    node.worker.app.memory_limit_mb = None
    assert storescu(node.port, [_phantom_study(tmp_path, "thigh", seed=8)]).returncode == 0
    wait_for((config.spool_dir / "jobs" / "2" / "attempt-1" / "app.log").is_file, 120, what="the next study started")
    # A stop mid-study kills the worker and requeues the job without counting the attempt.
    pid = node.worker.app.pid
    node.stop()
    assert not psutil.pid_exists(pid)
    assert [(job["state"], job["attempts"]) for job in jobs_of(config)] == [("dead", 1), ("stable", 0)]


@needs_models
@pytest.mark.skipif(shutil.which("storescp") is None or shutil.which("dciodvfy") is None,
                    reason="dcmtk storescp or dicom3tools dciodvfy not on PATH")
def test_real_application_end_to_end_to_a_dcmtk_storescp(tmp_path, nodes):
    from msk_node_phantoms import write_phantom

    case = write_phantom("knee", tmp_path / "case", seed=424250, n_slices=16)
    files = sorted((case / "dicom").rglob("*.dcm"))
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = node_config(tmp_path, None, [{"type": "cstore", "ae_title": "PACS", "host": "127.0.0.1",
                                               "port": port}], models_dir=str(MODELS), job_timeout_s=600)
        node = nodes(config)
        sent = storescu(node.port, [case / "dicom"])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # One more instance of the series whose pixel data is truncated: the application
        # skips it (and says so in its report); the series is still complete without it.
        corrupt = pydicom.dcmread(files[3])
        corrupt.SOPInstanceUID = corrupt.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        corrupt.PixelData = corrupt.PixelData[:1000]
        assert _send_with_pynetdicom(node.port, [corrupt]) == [0x0000]
        wait_for(lambda: states(config)[-1:] in (["delivered"], ["dead"], ["failed"]), 600, interval=1,
                 what="the real application")
        (job,) = jobs_of(config)
        assert job["state"] == "delivered", job["reason"]
        assert job["input_instances"] == len(files) + 1
        assert "series: segmented 1" in job["reason"] and "1 input(s) skipped" in job["reason"]
        by_modality = {pydicom.dcmread(path).Modality: path for path in received.iterdir()}
        # SEG, SR and the clinician report as Encapsulated PDF (DOC) and Secondary Capture (OT)
        assert sorted(by_modality) == ["DOC", "OT", "SEG", "SR"] and len(list(received.iterdir())) == 4
        for path in by_modality.values():
            assert dciodvfy_errors(path) == []
        assert sr_validator_errors(by_modality["SR"]) == []
        assert tid1500_read(by_modality["SR"])["Measurements"]
    finally:
        pacs.terminate()
        pacs.wait(30)


REAL_KNEE = Path(os.environ.get("MSK_NODE_REAL_KNEE", Path(__file__).resolve().parent.parent.parent
                                / "shared" / "data" / "knee-mri-ge-3t"))


@pytest.mark.skipif(not (REAL_KNEE / "dess-echo1").is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
@pytest.mark.skipif(not (MODELS / "detector" / "manifest.yaml").is_file(),
                    reason=f"default models not found under {MODELS}")
def test_real_knee_study_sent_by_storescu_becomes_one_job_with_a_valid_seg(tmp_path, nodes):
    """The real series (DESS echoes 1 and 2, four CubeQuant spin-lock series) as the one study they were on the scanner."""
    study_uid = generate_uid()
    sent_dir = tmp_path / "sent"
    count = 0
    for path in sorted(REAL_KNEE.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid  # copies only: the user's files are never altered
        target = sent_dir / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        count += 1
    config = node_config(tmp_path, None, [{"type": "folder", "path": str(tmp_path / "store")}],
                         models_dir=str(MODELS), job_timeout_s=900)
    node = nodes(config)
    sent = storescu(node.port, [sent_dir])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: states(config)[-1:] in (["delivered"], ["dead"], ["failed"]), 900, interval=2,
             what="the real knee study")
    (job,) = jobs_of(config)
    assert job["state"] == "delivered", job["reason"]
    assert job["input_instances"] == count == 240
    results = sorted((tmp_path / "store" / study_uid).iterdir())
    by_modality: dict[str, list] = {}
    for path in results:
        by_modality.setdefault(pydicom.dcmread(path, stop_before_pixels=True).Modality, []).append(path)
    # Each DESS echo is a sagittal knee series of its own: one SEG and one SR each. The T1rho map and the DESS T2
    # map are one Parametric Map (modality OT) each, shared by both; the study's clinician report is one
    # Encapsulated PDF (DOC) and one Secondary Capture (OT).
    assert set(by_modality) == {"SEG", "SR", "OT", "DOC"} and len(by_modality["SEG"]) == len(by_modality["SR"]) == 2
    assert len(by_modality["DOC"]) == 1
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in by_modality["OT"]]
    assert sorted(h.SOPClassUID for h in headers if h.SOPClassUID != "1.2.840.10008.5.1.4.1.1.30") == [
        "1.2.840.10008.5.1.4.1.1.7"]  # the report page
    maps = [h for h in headers if h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    assert all(m.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" for m in maps)
    assert sorted(m.ContentLabel for m in maps) == ["DESS_T2", "T1RHO"]
    for path in by_modality["SEG"]:
        seg = pydicom.dcmread(path)
        assert seg.StudyInstanceUID == study_uid and seg.PatientID == ""
        assert int(seg.NumberOfFrames) == 80 * len(seg.SegmentSequence)
    for path in results:
        assert dciodvfy_errors(path) == []
    reports = {}
    for path in by_modality["SR"]:
        assert sr_validator_errors(path) == []
        report = tid1500_read(path)  # 3D Slicer's reader
        reports[report["Measurements"][0]["SourceSeriesForImageSegmentation"]] = (pydicom.dcmread(path), report)
    _assert_femoral_relaxometry(*reports[_first_dess_echo_series(sent_dir)])


#: Measurement methods of the two relaxation times in the real knee's SR.
SPIN_LOCK, DESS = "Mono-exponential spin-lock fit", "Two-echo DESS signal model (Sveinsson 2017)"


def _first_dess_echo_series(folder: Path) -> str:
    return str(pydicom.dcmread(next((folder / "dess-echo1").glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def _assert_femoral_relaxometry(sr: pydicom.Dataset, report: dict) -> None:
    """Femoral cartilage T1rho and DESS T2 of the first DESS echo's SR: healthy 3 T values in ms, each with the
    share of its voxels rejected, the DESS T2 coded apart from a multi-echo T2 by its method."""
    values = read_measurements(sr)
    t1rho = values[("femoral_cartilage", f"T1rho relaxation time (Mean) [{SPIN_LOCK}]")]
    dess_t2 = values[("femoral_cartilage", f"T2 (Mean) [{DESS}]")]
    shares = [values[("femoral_cartilage", f"Rejected voxel share [{method}]")] for method in (SPIN_LOCK, DESS)]
    print(f"real knee femoral cartilage: T1rho {t1rho:.1f} ms, DESS T2 {dess_t2:.1f} ms, rejected {shares} %")
    assert 35.0 <= t1rho <= 60.0 and 20.0 <= dess_t2 <= 45.0
    assert all(0.0 <= share < 50.0 for share in shares)
    (group,) = [g for g in report["Measurements"] if g["TrackingIdentifier"] == "femoral_cartilage"]
    items = [(item["quantity"]["CodeMeaning"], float(item["value"]), item["units"]["CodeValue"])
             for item in group["measurementItems"]]

    def unit(quantity: str, value: float) -> str:
        return next(u for q, v, u in items if q == quantity and v == pytest.approx(value, rel=1e-6))

    assert unit("T1rho relaxation time", t1rho) == unit("T2", dess_t2) == "ms"
    assert [unit("Rejected voxel share", share) for share in shares] == ["%", "%"]


@needs_models
def test_job_reason_comes_from_the_applications_status_json(tmp_path, nodes, dest, monkeypatch):
    """The one-shot application with corrupted weights: its status.json, not its log, names the reason."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    weights = models / "detector" / "detector.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    config = node_config(tmp_path, [sys.executable, "-m", "msk_node_app"], [dest.destination()], models_dir=str(models),
                         max_attempts=1, job_timeout_s=300)
    node = nodes(config)
    study = make_study(tmp_path / "study", n=3)
    assert storescu(node.port, [study[0].parent]).returncode == 0
    wait_for(lambda: states(config) == ["dead"], 300, interval=0.5, what="dead job")
    (job,) = jobs_of(config)
    app_status = json.loads((Path(job["output_dir"]) / "status.json").read_text())
    assert app_status["exit_code"] == EXIT_BAD_MODELS
    assert job["reason"] == f"exit code {EXIT_BAD_MODELS}: {app_status['reason']}"
    assert "detector.pt are corrupted or replaced" in job["reason"]
    assert dest.received == []
