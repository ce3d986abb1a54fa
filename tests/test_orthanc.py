"""The Orthanc integration: orthanc/orthanc.json, the msk_forward.py plugin, orthanc/node.yaml.

Two kinds of tests:

* the plugin's decisions against a fake ``orthanc`` module (fast, run everywhere);
* Orthanc 1.10.1 (Debian, with the DICOMweb and Python plugins) and the node side by
  side in a private network namespace (root, ``unshare``): a study C-STOREd into Orthanc
  is forwarded to the node and its SEG comes back into the same study, once. See
  tests/orthanc_helpers.py for the driver that runs inside the namespace.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import types
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (Comprehensive3DSRStorage, ParametricMapStorage, SecondaryCaptureImageStorage,
                        SegmentationStorage)

from msk_node.dicom_input import Series
from msk_node.report_writer import ENCAPSULATED_PDF_STORAGE
from msk_node.selection import load_rules, rules_json, select_series
from msk_node_service import NodeConfig
from tests.conftest import REAL_KNEE, real_knee_as_one_study
from tests.orthanc_helpers import ORTHANC_DIR, REPO, run_scenario, skip_reason

MODELS = Path(os.environ.get("MSK_NODE_MODELS", REPO / "models"))
PLUGIN = ORTHANC_DIR / "msk_forward.py"
PLUGIN_RULES = REPO / "msk_node" / "config" / "series_rules.json"

needs_orthanc = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


# -- configuration files ------------------------------------------------------------------

def test_orthanc_and_node_configs_agree_and_every_key_is_documented():
    orthanc = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    node = NodeConfig.load(ORTHANC_DIR / "node.yaml")
    aet, host, port = orthanc["DicomModalities"][orthanc["MskNode"]["Modality"]]
    assert (aet, host, port) == (node.ae_title, node.host, node.port)
    assert node.allowed_calling_aes == (orthanc["DicomAet"],)
    (destination,) = node.destinations
    assert (destination.type, destination.ae_title, destination.host, destination.port) == (
        "cstore", orthanc["DicomAet"], "127.0.0.1", orthanc["DicomPort"])
    assert orthanc["RemoteAccessAllowed"] is False and orthanc["DicomAlwaysAllowStore"] is False
    assert orthanc["DicomWeb"]["Enable"] and orthanc["DicomWeb"]["Root"] == "/dicom-web/"
    assert Path(orthanc["PythonScript"]).name == PLUGIN.name
    assert "MskNodeForwarded" in orthanc["UserMetadata"]
    readme = (ORTHANC_DIR / "README.md").read_text()
    keys = [*orthanc, *orthanc["DicomWeb"], *orthanc["MskNode"]]
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert missing == [], f"orthanc/README.md does not document {missing}"


# -- the plugin against a fake orthanc module -------------------------------------------------

class FakeOrthanc:
    """Just enough of Orthanc's REST API and plugin SDK for msk_forward.py."""

    def __init__(self, config: dict | None = None, metadata_declared: bool = True) -> None:
        self.config = {"MskNode": {}} if config is None else config
        self.metadata_declared = metadata_declared
        self.studies: dict[str, dict] = {}
        self.series: dict[str, dict] = {}
        self.metadata: dict[str, str] = {}
        self.posts: list[tuple[str, dict]] = []
        self.logs: list[str] = []
        self.change_callback = None
        self.rest_callbacks: dict = {}

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("orthanc")
        fake.ChangeType = types.SimpleNamespace(STABLE_STUDY=1, JOB_SUCCESS=2, JOB_FAILURE=3, ORTHANC_STARTED=4)
        fake.GetConfiguration = lambda: json.dumps(self.config)
        fake.LogInfo = fake.LogWarning = fake.LogError = self.logs.append
        fake.RestApiGet = self.get
        fake.RestApiPost = self.post
        fake.RestApiPut = self.put
        fake.RegisterOnChangeCallback = lambda callback: setattr(self, "change_callback", callback)
        fake.RegisterRestCallback = lambda uri, callback: self.rest_callbacks.__setitem__(uri, callback)
        return fake

    def add_series(self, study: str, series: str, instances: int, **tags: str) -> None:
        self.studies.setdefault(study, {"ID": study, "MainDicomTags": {"StudyInstanceUID": f"1.2.{len(self.studies)}"},
                                        "Series": []})
        if series not in self.studies[study]["Series"]:
            self.studies[study]["Series"].append(series)
        self.series[series] = {"ID": series, "MainDicomTags": tags,
                               "Instances": [f"{series}-{i}" for i in range(instances)]}

    def get(self, uri: str) -> bytes:
        if match := re.fullmatch(r"/studies/([^/]+)", uri):
            return json.dumps(self.studies[match[1]]).encode()
        if match := re.fullmatch(r"/studies/([^/]+)/series", uri):
            return json.dumps([self.series[s] for s in self.studies[match[1]]["Series"]]).encode()
        if match := re.fullmatch(r"/series/([^/]+)/metadata/MskNodeForwarded", uri):
            if match[1] not in self.metadata:
                raise RuntimeError("Unknown resource")
            return self.metadata[match[1]].encode()
        if match := re.fullmatch(r"/instances/(.+)-\d+/simplified-tags", uri):
            return json.dumps(self.series[match[1]]["MainDicomTags"]).encode()
        if match := re.fullmatch(r"/jobs/([^/]+)", uri):
            return json.dumps({"ErrorDescription": "Error in the network protocol", "ErrorDetails": ""}).encode()
        raise RuntimeError(f"unexpected GET {uri}")

    def post(self, uri: str, body: str) -> bytes:
        self.posts.append((uri, json.loads(body) if body else {}))
        return json.dumps({"ID": f"job-{len(self.posts)}"}).encode()

    def put(self, uri: str, body: str) -> None:
        if not self.metadata_declared:
            raise RuntimeError("Bad request: unknown metadata")
        self.metadata[re.fullmatch(r"/series/([^/]+)/metadata/MskNodeForwarded", uri)[1]] = body

    def stable(self, study: str) -> None:
        self.change_callback(1, 0, study)

    def store_posts(self) -> list[dict]:
        return [body for uri, body in self.posts if uri.startswith("/modalities/")]


def load_plugin(fake: FakeOrthanc, monkeypatch) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "orthanc", fake.module())
    spec = importlib.util.spec_from_file_location("msk_forward_under_test", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    return plugin


SAGITTAL, AXIAL = (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0)
KNEE = {"Modality": "MR", "BodyPartExamined": "KNEE", "SeriesDescription": "Sag PD", "Manufacturer": "ACME",
        "ImageOrientationPatient": "0\\1\\0\\0\\0\\-1"}
OWN_SEG = {"Modality": "SEG", "SeriesDescription": "msk-node segmentation", "Manufacturer": "msk-node"}

#: Series as a site sends them: (description, tags, orientation, images); each is judged by the plugin and by
#: msk_node.selection on the same headers.
SITE_SERIES = [
    ("knee DESS", {"BodyPartExamined": "KNEE", "SeriesDescription": "Sag 3D DESS WE"}, SAGITTAL, 40),
    ("knee DESS without body part", {"SeriesDescription": "Sag DESS knee"}, SAGITTAL, 40),
    ("knee localizer", {"BodyPartExamined": "KNEE", "SeriesDescription": "3-plane localizer"}, SAGITTAL, 9),
    ("thigh axial", {"BodyPartExamined": "THIGH", "SeriesDescription": "Ax T1 thighs"}, AXIAL, 30),
    ("thigh sagittal", {"BodyPartExamined": "THIGH", "SeriesDescription": "Sag T1 thigh"}, SAGITTAL, 30),
    ("spine sagittal", {"BodyPartExamined": "LSPINE", "SeriesDescription": "Sag T2 FSE"}, SAGITTAL, 15),
    ("spine sagittal, description only", {"SeriesDescription": "Sag T1 lumbar spine"}, SAGITTAL, 15),
    ("spine STIR", {"BodyPartExamined": "LSPINE", "SeriesDescription": "Sag STIR"}, SAGITTAL, 15),
    ("CT knee", {"Modality": "CT", "BodyPartExamined": "KNEE", "SeriesDescription": "CT knee"}, AXIAL, 120),
    ("brain MR", {"BodyPartExamined": "HEAD", "SeriesDescription": "Ax T2 FLAIR"}, AXIAL, 24),
    ("scanner T2 map", {"BodyPartExamined": "KNEE", "SeriesDescription": "T2 Map", "ImageType": "DERIVED"},
     SAGITTAL, 20),
    ("knee with too few slices", {"BodyPartExamined": "KNEE", "SeriesDescription": "Sag PD"}, SAGITTAL, 5),
]


def site_series_headers(tags: dict, orientation: tuple, images: int) -> tuple[dict, Series]:
    """Orthanc's view (series main tags) and the application's view (datasets) of one series."""
    tags = {"Modality": "MR", **tags}
    orthanc_tags = {**tags, "ImageOrientationPatient": "\\".join(str(v) for v in orientation)}
    series = Series(series_instance_uid="1.2.3")
    for number in range(images):
        ds = pydicom.Dataset()
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.ImageOrientationPatient = list(orientation)
        ds.InstanceNumber = number + 1
        series.datasets.append(ds)
    return orthanc_tags, series


@pytest.mark.parametrize(("name", "tags", "orientation", "images"), SITE_SERIES, ids=[s[0] for s in SITE_SERIES])
def test_plugin_trigger_agrees_with_the_application_series_selection(monkeypatch, name, tags, orientation, images):
    plugin = load_plugin(FakeOrthanc(), monkeypatch)
    orthanc_tags, series = site_series_headers(tags, orientation, images)
    selected, _ = select_series([series], load_rules())
    expected = f"rule {selected[0].rule.name}" if selected else None
    assert plugin.msk_rule(orthanc_tags, images) == expected


def test_site_series_cover_every_rule_and_rejections():
    chosen = [select_series([site_series_headers(*case[1:])[1]], load_rules())[0] for case in SITE_SERIES]
    assert {s[0].rule.name for s in chosen if s} == {rule.name for rule in load_rules()}
    assert sum(not s for s in chosen) == 7


def test_plugin_reads_the_json_rendering_of_the_rules_file_which_matches_the_yaml():
    assert PLUGIN_RULES.read_text() == rules_json(), "run: msk-node rules --json -o msk_node/config/series_rules.json"


def test_unreadable_rules_file_is_logged_and_nothing_triggers(monkeypatch, tmp_path):
    (tmp_path / "rules.json").write_text('{"rules": [{"name": "x", "description": ["(unclosed"]}]}')
    fake = FakeOrthanc({"MskNode": {"RulesFile": str(tmp_path / "rules.json")}})
    plugin = load_plugin(fake, monkeypatch)
    assert plugin.msk_rule(KNEE, 20) is None
    assert any("cannot read the series rules" in line for line in fake.logs)


def test_own_results_are_seg_sr_or_parametric_maps_of_manufacturer_msk_node(monkeypatch):
    plugin = load_plugin(FakeOrthanc(), monkeypatch)
    assert plugin.is_own_result(OWN_SEG)
    assert plugin.is_own_result({"Modality": "SR", "Manufacturer": "msk-node"})
    assert plugin.is_own_result({"Modality": "OT", "Manufacturer": "msk-node"})
    assert not plugin.is_own_result({"Modality": "SEG", "Manufacturer": "Other Vendor"})
    assert not plugin.is_own_result({"Modality": "MR", "Manufacturer": "msk-node"})
    assert not plugin.is_own_result({"Modality": "MR", "Manufacturer": "msk-node phantom"})


@pytest.mark.parametrize("metadata_declared", [True, False])
def test_study_is_forwarded_once_then_again_only_for_new_instances(monkeypatch, metadata_declared):
    fake = FakeOrthanc(metadata_declared=metadata_declared)
    plugin = load_plugin(fake, monkeypatch)
    fake.add_series("st1", "knee", 16, **KNEE)
    fake.add_series("st1", "scout", 3, Modality="MR", SeriesDescription="localizer")
    fake.stable("st1")
    (body,) = fake.store_posts()
    assert body == {"Resources": ["knee", "scout"], "Synchronous": False}
    assert fake.posts[0][0] == "/modalities/msk-node/store"
    if metadata_declared:
        assert fake.metadata == {"knee": "16", "scout": "3"}
    # The node's SEG arrives: the study is stable again and must not go back to the node.
    fake.add_series("st1", "seg", 1, **OWN_SEG)
    fake.stable("st1")
    assert len(fake.store_posts()) == 1
    # More images of the knee series arrive later: the study (without the SEG) goes again.
    fake.add_series("st1", "knee", 20, **KNEE)
    fake.stable("st1")
    assert fake.store_posts()[1] == {"Resources": ["knee", "scout"], "Synchronous": False}
    actions = [(row["action"], row.get("reason")) for row in plugin._decisions]
    assert actions == [("forwarded", "rule knee-sagittal"), ("skipped", "already sent to the node"),
                       ("forwarded", "rule knee-sagittal")]
    assert any("declare it in UserMetadata" in line for line in fake.logs) == (not metadata_declared)


def test_non_msk_and_result_only_studies_are_skipped(monkeypatch):
    fake = FakeOrthanc()
    plugin = load_plugin(fake, monkeypatch)
    fake.add_series("ct", "ct1", 50, Modality="CT", BodyPartExamined="KNEE")
    fake.add_series("brain", "b1", 20, Modality="MR", BodyPartExamined="HEAD", SeriesDescription="Ax T2")
    fake.add_series("segonly", "s1", 1, **OWN_SEG)
    for study in ("ct", "brain", "segonly"):
        fake.stable(study)
    assert fake.store_posts() == []
    assert [row["reason"] for row in plugin._decisions] == ["no MSK series", "no MSK series", "only msk-node results"]


def test_configuration_section_is_read_and_bad_values_fall_back(monkeypatch, tmp_path):
    hip_rules = tmp_path / "rules.json"
    hip_rules.write_text(json.dumps({"rules": [{"name": "hip-coronal", "anatomy": "hip", "modality": ["MR"],
                                                "plane": "coronal", "body_part": ["HIP"]}]}))
    config = {"MskNode": {"Modality": "node2", "RulesFile": str(hip_rules), "OwnManufacturer": 5,
                          "BodyParts": ["HIP"]}}
    fake = FakeOrthanc(config)
    plugin = load_plugin(fake, monkeypatch)
    assert plugin.SETTINGS["Modality"] == "node2" and plugin.SETTINGS["OwnManufacturer"] == "msk-node"
    coronal = "1\\0\\0\\0\\0\\-1"
    assert plugin.msk_rule({"Modality": "MR", "BodyPartExamined": "HIP", "ImageOrientationPatient": coronal},
                           1) == "rule hip-coronal"
    assert plugin.msk_rule(KNEE, 20) is None
    text = "\n".join(fake.logs)
    assert "MskNode.BodyParts ignored" in text and "MskNode.OwnManufacturer must be" in text
    fake.add_series("st", "hip", 10, Modality="MR", BodyPartExamined="HIP", ImageOrientationPatient=coronal)
    fake.stable("st")
    assert fake.posts[0][0] == "/modalities/node2/store"


def test_failed_store_job_is_retried_then_reported(monkeypatch):
    config = {"MskNode": {"StoreRetries": 1, "StoreRetryDelay": 0}}
    fake = FakeOrthanc(config)
    plugin = load_plugin(fake, monkeypatch)
    timers = []
    monkeypatch.setattr(plugin.threading, "Timer", lambda delay, fn, args: types.SimpleNamespace(
        start=lambda: timers.append((delay, fn, args)), daemon=True))
    fake.add_series("st", "knee", 8, **KNEE)
    fake.stable("st")
    fake.change_callback(3, 0, "job-1")                     # JOB_FAILURE
    ((delay, resubmit, args),) = timers
    resubmit(*args)
    assert fake.posts[-1] == ("/jobs/job-1/resubmit", {})
    fake.change_callback(3, 0, "job-1")                     # fails again: gives up
    assert [row["action"] for row in plugin._decisions] == ["forwarded", "retrying", "error"]
    assert "POST /jobs/job-1/resubmit" in plugin._decisions[-1]["reason"]
    fake.change_callback(2, 0, "job-1")                     # resubmitted by hand: succeeds
    assert plugin._decisions[-1]["action"] == "delivered"
    fake.change_callback(2, 0, "someone-elses-job")
    assert len(plugin._decisions) == 4


# -- Orthanc and the node in a private network namespace --------------------------------------

def assert_forwarded_once_and_seg_back(result: dict) -> None:
    assert "error" not in result, result["error"]
    (job,) = result["node_jobs"]
    assert job["state"] == "delivered", job["reason"]
    assert job["calling_ae"] == "ORTHANC" and job["input_instances"] == result["instances"]
    assert job["study_uid"] == result["study_uid"]
    series = result["qido_series"]
    assert [s["modality"] for s in series].count("MR") == 1 and "SEG" in [s["modality"] for s in series], series
    results = [s for s in series if s["modality"] != "MR"]
    assert all(s["modality"] in ("SEG", "SR", "OT", "DOC") and s["manufacturer"] == "msk-node" for s in results), series
    actions = [row["action"] for row in result["decisions"]]
    assert actions.count("forwarded") == 1 and actions[-1] == "skipped", result["decisions"]
    assert result["decisions"][-1]["reason"] == "already sent to the node"
    assert [job["state"] for job in result["store_jobs"]] == ["Success"]
    log = "\n".join(result["plugin_log"])
    assert "action=forwarded" in log and result["study_uid"] in log
    for identifier in result["patient_identifiers"]:
        assert identifier not in log


@needs_orthanc
def test_knee_study_goes_through_orthanc_to_the_node_and_its_seg_comes_back_once(tmp_path):
    result = run_scenario(tmp_path, {"scenario": "forward", "app": "stub", "destination": "cstore"}, timeout=120)
    assert_forwarded_once_and_seg_back(result)
    assert result["decisions"][0]["reason"] == "rule knee-sagittal"
    assert result["times"]["total"] < 60, result["times"]


@needs_orthanc
def test_results_over_stow_rs_and_a_node_that_starts_late(tmp_path):
    result = run_scenario(tmp_path, {"scenario": "forward", "app": "stub", "destination": "stow", "node_late": True},
                          timeout=120)
    assert_forwarded_once_and_seg_back(result)
    assert [row["action"] for row in result["decisions"]][:2] == ["forwarded", "retrying"]


@needs_orthanc
def test_non_msk_studies_and_result_only_studies_are_not_forwarded(tmp_path):
    result = run_scenario(tmp_path, {"scenario": "filter"}, timeout=120)
    assert "error" not in result, result["error"]
    reasons = {name: [row["reason"] for row in rows] for name, rows in result["decisions"].items()}
    assert reasons == {"ct_knee": ["no MSK series"], "mr_brain": ["no MSK series"],
                       "seg_only": ["only msk-node results"]}
    assert result["node_jobs"] == [] and result["store_jobs"] == []


@needs_orthanc
@pytest.mark.skipif(not (MODELS / "detector" / "manifest.yaml").is_file()
                    or not (MODELS / "segmenter" / "manifest.yaml").is_file(),
                    reason=f"default models not found under {MODELS} (models/detector/manifest.yaml missing)")
def test_real_application_seg_lands_in_the_same_study_in_orthanc(tmp_path):
    result = run_scenario(tmp_path, {"scenario": "forward", "app": "real", "destination": "cstore",
                                     "models_dir": str(MODELS), "job_timeout": 150}, timeout=210)
    assert_forwarded_once_and_seg_back(result)
    assert "series: segmented 1" in result["node_jobs"][0]["reason"]
    # The clinician report lands in the same study: its PDF (DOC) and its Secondary Capture (OT).
    classes = {s["modality"]: s["sop_classes"] for s in result["qido_series"]}
    assert classes["DOC"] == [ENCAPSULATED_PDF_STORAGE], classes
    assert classes["OT"] == [SecondaryCaptureImageStorage], classes
    assert classes["SR"] == [Comprehensive3DSRStorage], classes
    # What OHIF fetches over DICOMweb to show them: the PDF document and the SC's RGB frame.
    reads = result["viewer_reads"]
    assert reads["pdf"] == {"mime": "application/pdf", "found": True, "ends_with_eof": True}, reads
    assert reads["sc"]["photometric"] == "RGB" and reads["sc"]["frame_bytes_at_least"], reads


@needs_orthanc
@pytest.mark.skipif(not (MODELS / "detector" / "manifest.yaml").is_file(),
                    reason=f"default models not found under {MODELS}")
@pytest.mark.skipif(not (REAL_KNEE / "dess-echo1").is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
def test_real_knee_results_and_clinician_report_land_in_its_study_in_orthanc(tmp_path):
    study = real_knee_as_one_study(tmp_path / "real-knee")
    result = run_scenario(tmp_path / "run", {"scenario": "forward", "app": "real", "destination": "cstore",
                                             "models_dir": str(MODELS), "study_dir": str(study), "job_timeout": 900},
                          timeout=1200)
    assert "error" not in result, result["error"]
    (job,) = result["node_jobs"]
    assert job["state"] == "delivered" and job["input_instances"] == result["instances"] == 240, job["reason"]
    classes = Counter(cls for s in result["qido_series"] if s["manufacturer"] == "msk-node" for cls in s["sop_classes"])
    # per DESS echo a SEG and an SR; the T1rho and DESS T2 Parametric Maps; the report's PDF and page
    assert classes == {SegmentationStorage: 2, Comprehensive3DSRStorage: 2, ParametricMapStorage: 2,
                       ENCAPSULATED_PDF_STORAGE: 1, SecondaryCaptureImageStorage: 1}, result["qido_series"]
    reads = result["viewer_reads"]
    assert reads["pdf"] == {"mime": "application/pdf", "found": True, "ends_with_eof": True}, reads
    assert reads["sc"]["photometric"] == "RGB" and reads["sc"]["frame_bytes_at_least"], reads


@needs_orthanc
@pytest.mark.parametrize("query_before_resend", [True, False])
def test_node_killed_after_orthanc_stored_its_result_asks_orthanc_before_sending_it_again(tmp_path,
                                                                                         query_before_resend):
    result = run_scenario(tmp_path, {"scenario": "crash", "trace_dicom": True,
                                     "query_before_resend": query_before_resend}, timeout=180)
    assert "error" not in result, result["error"]
    sop = result["sop_uid"]
    # Killed right after Orthanc answered the C-STORE of the SEG, before the job store recorded it.
    assert result["exit"] == -signal.SIGKILL
    assert result["after_crash"] == {"state": "delivering", "in_doubt": [sop], "delivered": [], "stores": {sop: 1}}
    (job,) = result["node_jobs"]
    assert (job["state"], job["deliveries"]) == ("delivered", 1), job["reason"]
    if query_before_resend:  # one C-FIND for it, still one C-STORE request, and the job says why
        assert result["finds"] == {sop: 1} and result["stores"] == {sop: 1}
        assert result["history"] == [f"{sop} found at cstore:ORTHANC@127.0.0.1:4242, not re-sent"]
    else:  # at-least-once: Orthanc gets a second C-STORE request for the same instance
        assert result["finds"] == {} and result["stores"] == {sop: 2}
        assert result["history"] == []


@needs_orthanc
def test_storage_commitment_report_from_orthanc_is_recorded_in_the_job_history(tmp_path):
    result = run_scenario(tmp_path, {"scenario": "commitment"}, timeout=120)
    assert "error" not in result, result["error"]
    sop = result["sop_uid"]
    assert result["commitments"] == {sop: "committed"}
    ((transaction, successes, failures),) = result["orthanc_reports"]
    assert (successes, failures) == ("1", "0")
    destination = "cstore:ORTHANC@127.0.0.1:4242"
    assert result["history"] == [f"1 instance(s) committed by {destination} (transaction {transaction})"]
