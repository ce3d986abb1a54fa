"""The node dashboard: a real headless Chromium follows a knee phantom study through the node and requeues it;
the token rule, job cancel, readiness and Prometheus metrics."""
from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from starlette.testclient import TestClient

from msk_node import cli
from msk_node.bench import send_files
from msk_node_service import ConfigError, DashboardConfig, JobStore, Node, NodeConfig, status
from msk_node_service.dashboard import create_app
from tests.service_helpers import make_study, node_config, node_config_file, stub_app, wait_for

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("MSK_NODE_MODELS", REPO / "models"))
CHROMIUM = Path("/usr/bin/chromium")
#: Where the screenshots are also copied for a person to look at (set to keep them past the test's tmp dir).
SHOTS_DIR = os.environ.get("MSK_NODE_SCREENSHOTS")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
LOOPBACK_DASHBOARD = {"enabled": True, "host": "127.0.0.1", "port": 0, "refresh_s": 1}


def job_rows(config: NodeConfig) -> list[dict]:
    return status(config)


def add_pdf_reports(output_dir: Path) -> None:
    """A ``report-*.pdf`` and an Encapsulated PDF instance among a job's results."""
    (output_dir / "report-knee.pdf").write_bytes(PDF)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EncapsulatedPDFStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
    ds.EncapsulatedDocument = PDF + b"\0"  # even length, padded as the standard says
    ds.save_as(output_dir / "encapsulated-report.dcm", enforce_file_format=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(output_dir / "report-knee-study.pdf.dcm", enforce_file_format=True)  # the name the node writes
    (output_dir / "broken.dcm").write_bytes(b"not DICOM")  # one unreadable file hides no report


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of a Prometheus text exposition (parsing it checks its format)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_dashboard_bound_beyond_loopback_needs_a_token_for_every_page_and_action(tmp_path, nodes, dest,
                                                                                   monkeypatch):
    assert NodeConfig.from_mapping({"ae_title": "N", "port": 0, "spool_dir": str(tmp_path)}).dashboard.enabled is False
    with pytest.raises(ConfigError, match="'dashboard.token' must be a non-empty string"):
        node_config(tmp_path, None, [dest.destination()], dashboard={"enabled": True, "token": " "})
    config_path = node_config_file(tmp_path, None, [dest.destination()])
    with pytest.raises(SystemExit, match="port must be 0-65535, got 99999"):
        cli.main(["serve", "--config", str(config_path), "--dashboard", "--dashboard-port", "99999"])
    exposed = cli.build_parser().parse_args(["serve", "--config", str(config_path), "--dashboard",
                                             "--dashboard-host", "0.0.0.0"])
    refused = "the dashboard binds '0.0.0.0' \\(not loopback\\) and has no token"
    for token in (None, "", "  "):  # unset, or set to nothing: no token either way
        if token is None:
            monkeypatch.delenv("MSK_NODE_DASHBOARD_TOKEN", raising=False)
        else:
            monkeypatch.setenv("MSK_NODE_DASHBOARD_TOKEN", token)
        with pytest.raises(SystemExit, match=refused):
            cli.main(["serve", "--config", str(config_path), "--dashboard", "--dashboard-host", "0.0.0.0"])
    monkeypatch.setenv("MSK_NODE_DASHBOARD_TOKEN", "from-the-environment")
    assert cli.serve_config(exposed).dashboard.token == "from-the-environment"

    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()])
    node = nodes(config)
    with pytest.raises(ValueError, match="not loopback"):
        create_app(node, DashboardConfig(enabled=True, host="0.0.0.0"))
    study = make_study(tmp_path / "study", n=2)
    assert send_files(node.port, study) == [0, 0]
    wait_for(lambda: [row["state"] for row in job_rows(config)] == ["delivered"], 30, what="stub study delivered")

    app = create_app(node, DashboardConfig(enabled=True, host="0.0.0.0", token="s3cret-token"))
    origin = {"origin": "http://testserver"}
    with TestClient(app) as anonymous:
        for path in ("/", "/jobs/1", "/metrics", "/jobs/1/files/report.json"):
            assert anonymous.get(path).status_code == 401, path
        # Probes of an orchestrator carry no token.
        assert anonymous.get("/healthz").json() == {"alive": True}
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.post("/jobs/1/requeue", headers=origin).status_code == 401
        page = anonymous.get("/", headers={"accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert anonymous.post("/login", data={"token": "wrong"}, headers=origin).status_code == 401
    with TestClient(app, headers={"authorization": "Bearer s3cret-token"}) as bearer:
        assert bearer.get("/readyz").json() == {"listener": True, "job_store": True, "worker": True}
        assert 'data-state="delivered"' in bearer.get("/").text
        # A form posted from another site (or with no origin at all) does nothing.
        for headers in ({"origin": "http://evil.example"}, {}):
            assert bearer.post("/jobs/1/requeue", headers=headers).status_code == 403
        assert job_rows(config)[0]["attempts"] == 1
    add_pdf_reports(Path(job_rows(config)[0]["output_dir"]))
    with TestClient(app) as browser:
        signed_in = browser.post("/login", data={"token": "s3cret-token"}, headers=origin, follow_redirects=False)
        assert signed_in.status_code == 303 and "httponly" in signed_in.headers["set-cookie"].lower()
        assert browser.get("/jobs/1").status_code == 200
        assert browser.get("/jobs/1/files/report.json").json()["series"] == [{"outcome": "segmented"}]
        study_page = browser.get("/jobs/1").text
        for name in ("report-knee.pdf", "encapsulated-report.pdf", "report-knee-study.pdf"):
            assert f'href="/jobs/1/files/{name}"' in study_page
            download = browser.get(f"/jobs/1/files/{name}")
            assert download.headers["content-type"] == "application/pdf" and download.content == PDF
        assert browser.get("/jobs/1/files/..%2Fapp.log").status_code == 404
        assert browser.get("/jobs/1/overlays/..%2Fattempt-1/slice-000.png").status_code == 404
        requeued = browser.post("/jobs/1/requeue", data={"back": "list"}, headers=origin, follow_redirects=False)
        assert requeued.status_code == 303 and requeued.headers["location"] == "/?message=job%201%3A%20stable"
    wait_for(lambda: [(r["state"], r["attempts"]) for r in job_rows(config)] == [("delivered", 2)], 30,
             what="requeued job delivered again")


def test_a_cancelled_job_never_runs_and_status_shows_it(tmp_path, capsys):
    config_path = node_config_file(tmp_path, None, [])
    config = NodeConfig.load(config_path)
    store = JobStore(config.database)
    try:
        job_id = store.record_instance("1.2.3", "1.2.3.1", "SCU", "reprocess", now=100.0).job_id
        store.mark_stable(job_id, 100.0, now=200.0)
        store.cancel(job_id, now=201.0)
        assert store.next_due(now=10_000.0) is None and store.received_jobs() == []
        with pytest.raises(ValueError, match="job 1 is cancelled; only received, stable, held, failed"):
            store.cancel(job_id)
        # A new instance of the study opens a new job; the cancelled one stays cancelled.
        again = store.record_instance("1.2.3", "1.2.3.2", "SCU", "reprocess", now=300.0)
        assert again.opened and again.job_id == job_id + 1
        assert store.job(job_id).state == "cancelled" and store.job(job_id).finished == 201.0
    finally:
        store.close()
    assert cli.main(["status", "--config", str(config_path)]) == 0
    table = capsys.readouterr().out
    assert "cancelled  0         cancelled by the operator (was stable)" in table
    assert cli.main(["cancel", "2", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out == "job 2: cancelled\n"
    assert cli.main(["retry", "1", "--config", str(config_path)]) == 0
    assert [(row["state"], row["attempts"]) for row in status(config)] == [("stable", 0), ("cancelled", 0)]


def test_readiness_and_metrics_count_the_delivered_job_and_the_dashboard_stops_with_the_node(tmp_path, nodes, dest):
    command, _ = stub_app(tmp_path / "stub")
    config = node_config(tmp_path, command, [dest.destination()], dashboard=LOOPBACK_DASHBOARD)
    node = nodes(config)
    base = f"http://127.0.0.1:{node.dashboard.port}"
    assert httpx.get(f"{base}/healthz").json() == {"alive": True}
    assert httpx.get(f"{base}/readyz").status_code == 200
    # Without a token only loopback names are answered: a rebound foreign host name reads nothing.
    assert httpx.get(f"{base}/", headers={"host": "attacker.example"}).status_code == 403
    assert httpx.get(f"http://localhost:{node.dashboard.port}/healthz").status_code == 200
    assert send_files(node.port, make_study(tmp_path / "study", n=3)) == [0, 0, 0]
    wait_for(lambda: [row["state"] for row in job_rows(config)] == ["delivered"], 30, what="stub study delivered")
    (job,) = job_rows(config)

    samples = metric_samples(httpx.get(f"{base}/metrics").text)
    assert samples[("msk_node_jobs", (("state", "delivered"),))] == 1
    assert sum(value for (name, _), value in samples.items() if name == "msk_node_jobs") == 1
    assert samples[("msk_node_job_turnaround_seconds_count", ())] == 1
    assert samples[("msk_node_job_turnaround_seconds_sum", ())] == pytest.approx(job["finished"] - job["created"])
    assert samples[("msk_node_oldest_queued_job_age_seconds", ())] == 0
    assert samples[("msk_node_delivery_failures_total", ())] == 0
    assert samples[("msk_node_associations_total", (("outcome", "accepted"),))] >= 1
    node.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz")


def test_a_node_whose_dashboard_cannot_bind_does_not_start(tmp_path, dest):
    command, _ = stub_app(tmp_path / "stub")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dashboard = {**LOOPBACK_DASHBOARD, "port": taken.getsockname()[1]}
        node = Node(node_config(tmp_path, command, [dest.destination()], dashboard=dashboard))
        with pytest.raises(OSError) as error:
            node.start()
    assert error.value.errno == errno.EADDRINUSE
    assert (node.server, node.worker, node.store, node.dashboard) == (None, None, None, None)


def _save_shot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if SHOTS_DIR:
        Path(SHOTS_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS_DIR) / path.name)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (scripts/setup.sh --test)")
@pytest.mark.skipif(not (MODELS / "detector" / "manifest.yaml").is_file(), reason=f"no models under {MODELS}")
def test_browser_follows_a_knee_study_to_delivered_sees_its_overlays_and_requeues_it(tmp_path, nodes, dest):
    playwright_api = pytest.importorskip("playwright.sync_api")
    from msk_node_phantoms import write_phantom

    case = write_phantom("knee", tmp_path / "case", seed=424250, n_slices=16)
    config = node_config(tmp_path, None, [dest.destination()], models_dir=str(MODELS), job_timeout_s=600,
                         dashboard=LOOPBACK_DASHBOARD)
    node = nodes(config)
    base = f"http://127.0.0.1:{node.dashboard.port}"
    files = sorted((case / "dicom").rglob("*.dcm"))
    assert set(send_files(node.port, files)) == {0}

    with playwright_api.sync_playwright() as playwright:
        # A persistent context on a fresh folder: the user data dir is this test's own.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 900})
        page = context.new_page()
        page.goto(base + "/")
        row = page.locator('tr[data-job="1"]')
        # The list reloads itself: wait for it to show the job delivered, without reloading it here.
        row.and_(page.locator('[data-state="delivered"]')).wait_for(timeout=600_000)
        assert row.get_attribute("data-attempts") == "1"
        assert row.locator("td").nth(5).inner_text() == "delivered"
        assert row.locator("td").nth(10).inner_text().endswith(" s")  # turnaround shown
        _save_shot(page, tmp_path / "dashboard-jobs.png")
        first_results = len(dest.sop_uids)
        assert first_results >= 2  # SEG and SR

        row.locator("a").first.click()
        page.wait_for_url(f"{base}/jobs/1")
        thumbnails = page.locator("img.overlay")
        assert thumbnails.count() >= 3
        for k in range(thumbnails.count()):
            thumbnails.nth(k).scroll_into_view_if_needed()
            wait_for(lambda k=k: thumbnails.nth(k).evaluate("img => img.complete && img.naturalWidth"), 30)
            assert thumbnails.nth(k).evaluate("img => img.naturalWidth") > 0
        measurements = page.locator("#measurements tbody tr")
        assert measurements.count() > 0
        structures = set(page.locator("#measurements tbody tr td:first-child").all_inner_texts())
        assert "femoral_cartilage" in structures, structures
        assert page.locator("#reports a", has_text="report.json").count() == 1
        # the clinician report, downloadable as the PDF it holds
        (pdf_link,) = [t for t in page.locator("#reports a").all_inner_texts() if t.startswith("report-")]
        assert pdf_link.endswith(".pdf") and not pdf_link.endswith(".pdf.pdf"), pdf_link
        assert httpx.get(f"{base}/jobs/1/files/{pdf_link}").content.startswith(b"%PDF-")
        _save_shot(page, tmp_path / "dashboard-study.png")

        page.locator("button", has_text="requeue").click()
        page.wait_for_url(f"{base}/jobs/1?message=*")
        assert page.locator(".message").inner_text() == "job 1: stable"
        page.goto(base + "/")
        row.and_(page.locator('[data-state="delivered"][data-attempts="2"]')).wait_for(timeout=600_000)
        _save_shot(page, tmp_path / "dashboard-jobs-requeued.png")
        context.close()
    assert len(dest.sop_uids) == 2 * first_results  # delivered again: new results, new instances
    (job,) = job_rows(config)
    assert (job["state"], job["attempts"]) == ("delivered", 2)
    assert job["history"][-1] == "requeued by the operator (was delivered)"
    assert Path(job["output_dir"]).parent.name == "attempt-2"
