"""The node dashboard: job list, study pages with overlays and measurements, health and Prometheus metrics.

A Starlette application served by uvicorn on a thread of the node process (see :class:`DashboardServer`).
Actions are POST forms that must come from the dashboard's own origin; with a token configured every
request needs it (``Authorization: Bearer``, or the cookie the login form sets).
"""
from __future__ import annotations

import hmac
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import pydicom
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydicom.uid import EncapsulatedPDFStorage
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from msk_node.overlay import render_seg_overlays
from msk_node_service.config import DashboardConfig, is_loopback_name
from msk_node_service.jobs import CANCELLABLE_STATES, FINISHED_STATES, OPEN_STATES, RETRYABLE_STATES, STATES, JobStore

if TYPE_CHECKING:
    from msk_node_service.node import Node

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("dashboard_templates")
TOKEN_COOKIE = "msk_node_dashboard"
#: Upper bounds of the turnaround histogram (seconds from the first instance to delivered).
TURNAROUND_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
#: Result files served for download besides the PDF reports.
REPORT_FILES = ("report.json", "measurements.json", "measurements.csv", "status.json")
#: Paths served without the token: the login form, and the probes an orchestrator polls.
OPEN_PATHS = ("/login", "/healthz", "/readyz")


def study_label(spool_study_dir: Path) -> dict[str, str]:
    """Accession number, study date and description of a spooled study: what names it without the patient."""
    for path in sorted(spool_study_dir.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["AccessionNumber", "StudyDate", "StudyDescription"])
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        date = str(ds.get("StudyDate", "") or "")
        return {"accession": str(ds.get("AccessionNumber", "") or ""),
                "date": f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
                "description": str(ds.get("StudyDescription", "") or "")}
    return {"accession": "", "date": "", "description": ""}


def pdf_reports(output_dir: Path) -> dict[str, Path]:
    """Download name -> file: ``report-*.pdf`` and Encapsulated PDF instances among the results."""
    reports = {path.name: path for path in sorted(output_dir.glob("report-*.pdf"))}
    for path in sorted(output_dir.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            logger.warning("%s not read: %s", path, error)
            continue
        if str(ds.get("SOPClassUID", "")) == EncapsulatedPDFStorage:
            stem = path.name.removesuffix(".dcm")
            reports[stem if stem.endswith(".pdf") else f"{stem}.pdf"] = path
    return reports


def loopback_host(host_header: str) -> bool:
    """The Host a browser sent names this machine (a page of another site rebound to 127.0.0.1 does not)."""
    return is_loopback_name(urlsplit(f"//{host_header}").hostname or "")


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) if epoch else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class NodeCollector:
    """Prometheus metrics read from the job store at each scrape."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self):
        store = self.node.store
        if store is None:
            return
        rows, health, now = store.status_rows(), store.association_health(), time.time()
        jobs = GaugeMetricFamily("msk_node_jobs", "Jobs in the job store by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], sum(row["state"] == state for row in rows))
        yield jobs
        queued = [row["created"] for row in rows if row["state"] in OPEN_STATES]
        yield GaugeMetricFamily("msk_node_oldest_queued_job_age_seconds",
                                "Age of the oldest job not yet run (received, stable or failed); 0 when none",
                                value=now - min(queued) if queued else 0.0)
        turnarounds = [row["finished"] - row["created"] for row in rows
                       if row["state"] == "delivered" and row["finished"] is not None]
        buckets = [(str(bound), sum(t <= bound for t in turnarounds)) for bound in TURNAROUND_BUCKETS]
        yield HistogramMetricFamily("msk_node_job_turnaround_seconds",
                                    "Seconds from a delivered job's first instance to its delivery",
                                    buckets=[*buckets, ("+Inf", len(turnarounds))], sum_value=sum(turnarounds))
        yield CounterMetricFamily("msk_node_delivery_failures", "Failed delivery tries of the jobs in the store",
                                  value=sum(row["delivery_tries"] for row in rows))
        associations = CounterMetricFamily("msk_node_associations",
                                           "Associations of this node run by how they ended", labels=["outcome"])
        counts = health["counts"] if health is not None else {}
        for outcome in ("accepted", "refused", "aborted", "dropped"):
            associations.add_metric([outcome], sum(counts.get(outcome, {}).values()))
        yield associations


def create_app(node: Node, config: DashboardConfig) -> Starlette:
    """The dashboard of a started ``node``; refuses a non-loopback bind address without a token."""
    if config.refusal() is not None:
        raise ValueError(config.refusal())
    templates = Jinja2Templates(directory=str(TEMPLATES))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    labels: dict[str, dict[str, str]] = {}
    render_lock = threading.Lock()

    def store() -> JobStore:
        if node.store is None:
            raise RuntimeError("the node is stopped")
        return node.store

    def label(study_uid: str) -> dict[str, str]:
        if study_uid not in labels and node.spool is not None:
            labels[study_uid] = study_label(node.spool.study_dir(study_uid))
        return labels.get(study_uid, {})

    def authorised(request: Request) -> bool:
        if config.token is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        return hmac.compare_digest(given.encode(), config.token.encode())

    def same_origin(request: Request) -> bool:
        # Browsers send Origin on cross-site POSTs; a form from elsewhere cannot forge it.
        source = request.headers.get("origin") or request.headers.get("referer")
        return source is not None and urlsplit(source).netloc == request.headers.get("host")

    def job_row(row: dict) -> dict:
        finished = row["finished"] if row["state"] in FINISHED_STATES else None
        turnaround = finished - row["created"] if finished else None
        return {**row, **label(row["study_uid"]), "received": _when(row["created"]),
                "started_at": _when(row["started"]), "finished_at": _when(finished),
                "turnaround": _duration(turnaround),
                "can_requeue": row["state"] in RETRYABLE_STATES, "can_cancel": row["state"] in CANCELLABLE_STATES}

    async def jobs_page(request: Request) -> Response:
        rows = [job_row(row) for row in reversed(store().status_rows())]
        return templates.TemplateResponse(request, "jobs.html", {
            "jobs": rows, "refresh_s": config.refresh_s, "message": request.query_params.get("message", ""),
            "ae_title": node.config.ae_title})

    def overlays(job_id: int, study_uid: str, output_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
        """SEG file -> overlay PNG names (rendered once into the attempt folder), and what could not be drawn."""
        drawn, problems = {}, []
        with render_lock:
            for seg in sorted(output_dir.glob("seg-*.dcm")):
                folder = output_dir.parent / "overlays" / seg.stem
                if not folder.is_dir():
                    partial = folder.with_name(folder.name + ".part")  # a failed render leaves no folder behind
                    shutil.rmtree(partial, ignore_errors=True)
                    try:
                        render_seg_overlays(seg, node.spool.study_dir(study_uid),
                                            node.config.models_dir / "detector" / "label_map.yaml", partial)
                    except (OSError, ValueError, KeyError, AttributeError, pydicom.errors.InvalidDicomError) as error:
                        problems.append(f"{seg.name}: {error}")
                        logger.warning("job %d: overlays of %s not drawn: %s", job_id, seg.name, error)
                        continue
                    partial.rename(folder)
                drawn[seg.name] = [path.name for path in sorted(folder.glob("slice-*.png"))]
        return drawn, problems

    async def study_page(request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        job = store().job(job_id)
        if job is None:
            return Response(f"no job {job_id}", status_code=404)
        row = job_row(next(r for r in store().status_rows() if r["id"] == job_id))
        output_dir = Path(job.output_dir) if job.output_dir else None
        drawn, problems, measurements, files, reports = {}, [], [], [], {}
        # Results are complete once the job delivers them; a running attempt's folder is still being written.
        if output_dir is not None and output_dir.is_dir() and job.state in ("delivering", "delivered"):
            drawn, problems = await run_in_threadpool(overlays, job_id, job.study_uid, output_dir)
            table = output_dir / "measurements.json"
            measurements = json.loads(table.read_text()) if table.is_file() else []
            files = [name for name in REPORT_FILES if (output_dir / name).is_file()]
            reports = pdf_reports(output_dir)
        return templates.TemplateResponse(request, "study.html", {
            "job": row, "overlays": drawn, "problems": problems, "measurements": measurements, "files": files,
            "reports": list(reports), "history": store().history(job_id), "ae_title": node.config.ae_title,
            "message": request.query_params.get("message", "")})

    def job_output_dir(request: Request) -> Path | None:
        job = store().job(int(request.path_params["job_id"]))
        return Path(job.output_dir) if job is not None and job.output_dir else None

    async def overlay_png(request: Request) -> Response:
        output_dir = job_output_dir(request)
        seg, name = request.path_params["seg"], request.path_params["name"]
        # Only the overlays of a SEG among the job's results: no other folder can be named.
        if (output_dir is None or not seg.startswith("seg-") or not (output_dir / f"{seg}.dcm").is_file()
                or not name.startswith("slice-") or not name.endswith(".png")):
            return Response("not found", status_code=404)
        path = output_dir.parent / "overlays" / seg / name
        return FileResponse(path, media_type="image/png") if path.is_file() else Response("not found", 404)

    async def result_file(request: Request) -> Response:
        output_dir = job_output_dir(request)
        name = request.path_params["name"]
        if output_dir is None:
            return Response("not found", status_code=404)
        if name in REPORT_FILES and (output_dir / name).is_file():
            return FileResponse(output_dir / name)
        reports = pdf_reports(output_dir) if output_dir.is_dir() else {}
        if name not in reports:
            return Response("not found", status_code=404)
        if reports[name].suffix == ".pdf":
            return FileResponse(reports[name], media_type="application/pdf", filename=name)
        document = pydicom.dcmread(reports[name]).EncapsulatedDocument
        return Response(bytes(document).rstrip(b"\0"), media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def action(request: Request) -> Response:
        job_id, verb = int(request.path_params["job_id"]), request.path_params["verb"]
        back = "/" if (await request.form()).get("back") != "study" else f"/jobs/{job_id}"
        try:
            if verb == "requeue":
                message = f"job {job_id}: {store().requeue(job_id)}"
            elif verb == "cancel":
                store().cancel(job_id)
                message = f"job {job_id}: cancelled"
            else:
                return Response("not found", status_code=404)
        except (KeyError, ValueError) as error:
            message = str(error.args[0] if error.args else error)
        if node.worker is not None:
            node.worker.wake()
        return RedirectResponse(f"{back}?message={quote(message)}", status_code=303)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return templates.TemplateResponse(request, "login.html",
                                              {"failed": False, "ae_title": node.config.ae_title})
        given = str((await request.form()).get("token", ""))
        if config.token is not None and hmac.compare_digest(given.encode(), config.token.encode()):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return response
        return templates.TemplateResponse(request, "login.html", {"failed": True, "ae_title": node.config.ae_title},
                                          status_code=401)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        checks = node.ready()
        return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def guard(request: Request, call_next) -> Response:
        # Without a token the dashboard answers only to its loopback names, so a page of another site
        # whose name was rebound to 127.0.0.1 (DNS rebinding) cannot read it or post to it.
        if config.token is None and not loopback_host(request.headers.get("host", "")):
            return Response("this dashboard answers on its loopback address only", status_code=403)
        if request.url.path not in OPEN_PATHS and not authorised(request):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse("/login", status_code=303)
            return Response("a token is required", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST" and not same_origin(request):
            return Response("cross-origin form refused", status_code=403)
        return await call_next(request)

    routes = [
        Route("/", jobs_page), Route("/jobs/{job_id:int}", study_page),
        Route("/jobs/{job_id:int}/overlays/{seg}/{name}", overlay_png),
        Route("/jobs/{job_id:int}/files/{name}", result_file),
        Route("/jobs/{job_id:int}/{verb}", action, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)])


class DashboardServer:
    """uvicorn serving :func:`create_app` on a thread of the node process."""

    def __init__(self, node: Node) -> None:
        self.config = node.config.dashboard
        server_config = uvicorn.Config(create_app(node, self.config), log_level="warning", access_log=False,
                                       lifespan="off")
        self.server = uvicorn.Server(server_config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the config says 0)."""
        if self._socket is None:
            raise RuntimeError("the dashboard is not started")
        return int(self._socket.getsockname()[1])

    def start(self, timeout: float = 10.0) -> None:
        """Bind (here, so a taken port raises OSError to the caller), then serve on a daemon thread."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self._socket = socket.create_server((self.config.host, self.config.port), family=family)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="msk-node-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dashboard did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.05)
        logger.info("dashboard on http://%s:%d/", self.config.host, self.port)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish open requests and close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
