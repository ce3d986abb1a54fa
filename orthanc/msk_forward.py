"""Orthanc Python plugin: forward stable MSK MRI studies to the msk-node DICOM node.

Runs inside Orthanc's embedded Python (orthanc-python); it uses only the standard
library and the ``orthanc`` module. Configure it in the Orthanc configuration:

    "PythonScript": "/path/to/orthanc/msk_forward.py",
    "UserMetadata": {"MskNodeForwarded": 4242},
    "MskNode": {
        "Modality": "msk-node",                    // DicomModalities entry of the node
        "RulesFile": "",                           // series rules as JSON; "" is the checkout's
                                                   //   msk_node/config/series_rules.json
        "OwnManufacturer": "msk-node",             // Manufacturer of the node's results
        "OwnModalities": ["SEG", "SR", "OT", "DOC"], // Modality of the node's results
                                                     // (OT: Parametric Maps, report image; DOC: PDF report)
        "StoreRetries": 3,                         // resubmissions of a failed store job
        "StoreRetryDelay": 30                      // seconds before the first; doubled each time
    }

On every ``STABLE_STUDY`` change the plugin lists the study's series and

* sets aside the node's own results (Modality SEG/SR/OT/DOC *and* Manufacturer "msk-node"):
  they are never sent to the node, and a study that holds nothing else is skipped;
* looks for a *trigger*: a series that one of the application's series-selection rules
  takes (``msk_node/config/series_rules.yaml``, read in its JSON rendering written by
  ``msk-node rules --json``; the same checks as ``msk_node.selection``: modality, plane
  from ImageOrientationPatient, instance count, SeriesDescription, BodyPartExamined), and that has
  instances the node has not been sent yet (the count sent is kept per series in the
  ``MskNodeForwarded`` metadata, or in memory when that metadata is not declared);
* with a trigger, sends every other series of the study to the node in one
  asynchronous C-STORE job (``POST /modalities/<Modality>/store``). A job that fails
  (node down) is resubmitted ``StoreRetries`` times, after ``StoreRetryDelay`` seconds
  and twice as long each time; after the last failure the error is logged and
  ``POST /jobs/<id>/resubmit`` sends the study by hand (the series stay marked as
  sent, so the study is not sent again by itself unless new instances arrive).

A study becomes stable again when the node's SEG/SR arrive in it; its MR series are
then already marked as sent, so nothing loops back. A study that gets more instances
later (a late series) is sent again, whole; the node itself does not reprocess
instances it already has.

Logs (warning level for forwarded/delivered/retrying/error, info level for skipped
studies: run Orthanc with ``--verbose`` to see those) name Orthanc resource IDs, StudyInstanceUIDs, counts and the rule that matched,
never patient attributes or descriptions. ``GET /msk-node/decisions`` returns the
recent decisions as JSON (same content as the log) for monitoring and tests.
"""
import collections
import json
import os
import re
import threading
import time

import orthanc

METADATA = "MskNodeForwarded"
DEFAULTS = {
    "Modality": "msk-node",
    "RulesFile": "",
    "OwnManufacturer": "msk-node",
    "OwnModalities": ["SEG", "SR", "OT", "DOC"],
    "StoreRetries": 3,
    "StoreRetryDelay": 30,
}
MAX_DECISIONS = 500
# The checkout's rules, beside this file's orthanc/ folder; Orthanc imports the script as a module.
DEFAULT_RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                  "msk_node", "config", "series_rules.json")
PLANES = ("sagittal", "coronal", "axial")

_lock = threading.Lock()
_decisions = collections.deque(maxlen=MAX_DECISIONS)
_jobs = {}            # Orthanc job ID -> {"study", "study_uid", "sent": {series ID: count}, "failures"}
_memory_marks = {}    # series ID -> instances sent, when the metadata cannot be written
_metadata_ok = [True]


def _log(level, message):
    {"info": orthanc.LogInfo, "warning": orthanc.LogWarning, "error": orthanc.LogError}[level]("msk-forward: " + message)


def _load_settings():
    settings = dict(DEFAULTS)
    try:
        section = json.loads(orthanc.GetConfiguration()).get("MskNode", {})
    except Exception as error:  # noqa: BLE001 - never stop Orthanc because of this plugin
        _log("error", "cannot read the configuration (%s); using the defaults" % error)
        section = {}
    if not isinstance(section, dict):
        _log("error", "the 'MskNode' configuration section is not an object; using the defaults")
        section = {}
    for key, value in section.items():
        if key not in DEFAULTS:
            _log("warning", "unknown key MskNode.%s ignored" % key)
            continue
        expected = type(DEFAULTS[key])
        if expected is int:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        else:
            valid = isinstance(value, expected) and (expected is not list or all(isinstance(v, str) for v in value))
        if not valid:
            kind = {list: "list of strings", str: "string", int: "number >= 0"}[expected]
            _log("error", "MskNode.%s must be a %s; using the default" % (key, kind))
            continue
        settings[key] = value
    settings["_rules"] = _load_rules(settings["RulesFile"] or DEFAULT_RULES_FILE)
    settings["_own_modalities"] = {m.upper() for m in settings["OwnModalities"]}
    return settings


def _load_rules(path):
    """The segmentation rules of the JSON rendering of the series rules file; none (nothing triggers) if unreadable."""
    try:
        with open(path) as stream:
            rules = json.load(stream)["rules"]
        for rule in rules:
            for key in ("exclude_description", "description"):
                rule[key] = [re.compile(p, re.IGNORECASE) for p in rule.get(key, [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error) as error:
        _log("error", "cannot read the series rules %s (%s): no study is forwarded; write them with "
                      "'msk-node rules --json -o %s'" % (path, error, path))
        return []
    return rules


SETTINGS = _load_settings()


def _get(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _decide(entry):
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with _lock:
        _decisions.append(entry)
    fields = " ".join("%s=%s" % (k, entry[k]) for k in ("action", "study", "study_uid", "reason", "job") if entry.get(k))
    # Orthanc shows warnings by default and info only with --verbose: what the plugin
    # sends (and what fails) is always visible, the many skipped studies are not.
    _log("info" if entry["action"] == "skipped" else "warning", fields)


def is_own_result(tags, settings=None):
    """True for a series the node produced (SEG, SR, Parametric Map, clinician report written by msk-node)."""
    settings = settings or SETTINGS
    return (tags.get("Modality", "").upper() in settings["_own_modalities"]
            and tags.get("Manufacturer", "").strip() == settings["OwnManufacturer"])


def imaging_plane(orientation):
    """Plane named by the dominant axis of the slice normal (as msk_node.selection), or None."""
    try:
        values = [float(v) for v in (orientation.split("\\") if isinstance(orientation, str) else orientation)]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    (a, b, c), (d, e, f) = values[:3], values[3:]
    normal = [abs(b * f - c * e), abs(c * d - a * f), abs(a * e - b * d)]
    return PLANES[normal.index(max(normal))]


def rule_takes(rule, tags, instances):
    """True when ``rule`` takes a series: msk_node.selection.rejection_reason, on Orthanc's series tags."""
    modalities = {m.upper() for m in rule.get("modality", [])}
    if modalities and tags.get("Modality", "").upper() not in modalities:
        return False
    plane = imaging_plane(tags.get("ImageOrientationPatient", ""))
    if plane is None or (rule.get("plane") and plane != rule["plane"]):
        return False
    if instances < rule.get("min_slices", 1):
        return False
    description = tags.get("SeriesDescription", "")
    if any(p.search(description) for p in rule["exclude_description"]):
        return False
    body_part = tags.get("BodyPartExamined", "").strip().upper()
    if body_part and rule.get("body_part"):
        return body_part in {b.upper() for b in rule["body_part"]}
    return not rule["description"] or any(p.search(description) for p in rule["description"])


def msk_rule(tags, instances, settings=None):
    """The name of the first series rule that takes a series of ``instances`` images (as "rule <name>"), or None."""
    settings = settings or SETTINGS
    for rule in settings["_rules"]:
        if rule_takes(rule, tags, instances):
            return "rule %s" % rule["name"]
    return None


def _sent_count(series_id):
    if _metadata_ok[0]:
        try:
            return int(orthanc.RestApiGet("/series/%s/metadata/%s" % (series_id, METADATA)))
        except Exception:  # noqa: BLE001 - absent metadata is an error in the REST API
            pass
    return _memory_marks.get(series_id, 0)


def _mark_sent(series_id, count):
    _memory_marks[series_id] = count
    if not _metadata_ok[0]:
        return
    try:
        orthanc.RestApiPut("/series/%s/metadata/%s" % (series_id, METADATA), str(count))
    except Exception as error:  # noqa: BLE001
        _metadata_ok[0] = False
        _log("warning", "cannot write the %s metadata (%s); declare it in UserMetadata. "
                        "Sent series are remembered in memory only until Orthanc restarts" % (METADATA, error))


def _series_tags(series):
    tags = dict(series.get("MainDicomTags", {}))
    missing = [key for key in ("Manufacturer", "ImageOrientationPatient") if key not in tags]
    if missing and series.get("Instances"):
        # Neither is a main DICOM tag of the series in every Orthanc version: read the first instance.
        try:
            instance = _get("/instances/%s/simplified-tags" % series["Instances"][0])
        except Exception as error:  # noqa: BLE001 - treated as not ours, so it is forwarded
            _log("warning", "cannot read the tags of series %s: %s" % (series["ID"], error))
            instance = {}
        for key in missing:
            tags[key] = str(instance.get(key, ""))
    return tags


def on_stable_study(study_id):
    study = _get("/studies/%s" % study_id)
    study_uid = study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
    entry = {"study": study_id, "study_uid": study_uid}
    series_list = _get("/studies/%s/series" % study_id)
    own, others, matched, triggers = [], [], [], []
    for series in series_list:
        tags = _series_tags(series)
        if is_own_result(tags):
            own.append(series["ID"])
            continue
        others.append(series)
        rule = msk_rule(tags, len(series.get("Instances", [])))
        if rule:
            matched.append(rule)
            if len(series.get("Instances", [])) > _sent_count(series["ID"]):
                triggers.append(rule)
    entry.update({"series": len(series_list), "own_results": len(own)})
    if not others:
        entry.update(action="skipped", reason="only msk-node results")
    elif not triggers:
        entry.update(action="skipped", reason="already sent to the node" if matched else "no MSK series")
    else:
        body = {"Resources": [s["ID"] for s in others], "Synchronous": False}
        answer = json.loads(orthanc.RestApiPost("/modalities/%s/store" % SETTINGS["Modality"], json.dumps(body)))
        job = answer.get("ID", "")
        sent = {s["ID"]: len(s.get("Instances", [])) for s in others}
        with _lock:
            _jobs[job] = {"study": study_id, "study_uid": study_uid, "sent": sent, "failures": 0}
        for series_id, count in sent.items():
            _mark_sent(series_id, count)
        entry.update(action="forwarded", job=job, sent_series=len(others),
                     sent_instances=sum(len(s.get("Instances", [])) for s in others),
                     reason="; ".join(sorted(set(triggers))))
    _decide(entry)


def _resubmit(job_id):
    try:
        orthanc.RestApiPost("/jobs/%s/resubmit" % job_id, "")
    except Exception as error:  # noqa: BLE001
        with _lock:
            known = _jobs.get(job_id, {})
        _decide({"action": "error", "study": known.get("study", ""), "study_uid": known.get("study_uid", ""),
                 "job": job_id, "reason": "cannot resubmit the store job: %s" % error})


def on_job_end(job_id, success):
    with _lock:
        known = _jobs.get(job_id)
        if known is None:
            return
        if success:
            del _jobs[job_id]
        else:
            known["failures"] += 1
    entry = {"study": known["study"], "study_uid": known["study_uid"], "job": job_id}
    if success:
        _decide(dict(entry, action="delivered"))
        return
    details = "store job failed"
    try:
        job = _get("/jobs/%s" % job_id)
        details = "store job failed: %s (%s)" % (job.get("ErrorDescription", ""), job.get("ErrorDetails", "") or "no details")
    except Exception:  # noqa: BLE001
        pass
    failures = known["failures"]
    if failures <= int(SETTINGS["StoreRetries"]):
        delay = float(SETTINGS["StoreRetryDelay"]) * 2 ** (failures - 1)
        _decide(dict(entry, action="retrying", reason="%s; resubmitting in %g s (retry %d of %d)"
                     % (details, delay, failures, int(SETTINGS["StoreRetries"]))))
        timer = threading.Timer(delay, _resubmit, args=(job_id,))
        timer.daemon = True
        timer.start()
        return
    # The job stays known: a resubmission by hand is still logged when it succeeds.
    _decide(dict(entry, action="error", reason="%s; gave up after %d attempt(s); resubmit with POST /jobs/%s/resubmit"
                 % (details, failures, job_id)))


def on_change(change_type, level, resource_id):
    try:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            on_stable_study(resource_id)
        elif change_type == orthanc.ChangeType.JOB_SUCCESS:
            on_job_end(resource_id, True)
        elif change_type == orthanc.ChangeType.JOB_FAILURE:
            on_job_end(resource_id, False)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            _log("info", "forwarding MSK studies to modality %r (series rules %s)"
                 % (SETTINGS["Modality"], ", ".join(rule["name"] for rule in SETTINGS["_rules"]) or "none"))
    except Exception as error:  # noqa: BLE001 - a failure must not stop the change thread
        _decide({"action": "error", "study": resource_id, "reason": "%s: %s" % (type(error).__name__, error)})


def on_decisions(output, uri, **request):
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    with _lock:
        body = json.dumps(list(_decisions))
    output.AnswerBuffer(body, "application/json")


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/msk-node/decisions", on_decisions)
