"""Node configuration: one YAML file, validated when it is loaded.

Every error names the key it is about (``destinations[1].port``) and the rule it
breaks, so a bad configuration stops the node at start-up instead of at the first study.
"""
from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msk_node.model_paths import default_models_dir

LATE_INSTANCE_POLICIES = ("reprocess", "ignore")
DESTINATION_TYPES = ("cstore", "stow", "folder")

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the listener.

    Parameters
    ----------
    cert : pathlib.Path
        PEM certificate of the node.
    key : pathlib.Path
        PEM private key of the node.
    ca : pathlib.Path, optional
        PEM bundle of the CAs whose client certificates are accepted; when given,
        calling peers must present a certificate signed by one of them.
    """

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class DashboardConfig:
    """The web dashboard ``msk-node serve`` runs next to the node (jobs, studies, health, metrics).

    Parameters
    ----------
    enabled : bool
        Serve it (default False).
    host : str
        Address to bind; the default, ``127.0.0.1``, keeps it on this machine.
    port : int
        TCP port; 0 picks a free one (tests).
    token : str, optional
        Required on every page, action and ``/metrics`` when given (``Authorization: Bearer <token>``
        or the login form's cookie); a dashboard bound to a non-loopback address is not served
        without one. ``/healthz`` and ``/readyz`` stay open for probes.
    refresh_s : float
        How often the job list reloads itself in the browser.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    refresh_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"host must be an address, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("token must not be empty (leave it out for a loopback dashboard)")
        if not isinstance(self.refresh_s, (int, float)) or isinstance(self.refresh_s, bool) or self.refresh_s <= 0:
            raise ValueError(f"refresh_s must be a positive number of seconds, got {self.refresh_s!r}")

    def refusal(self) -> str | None:
        """Why this dashboard must not be served (bound beyond loopback without a token); None when it may."""
        if self.enabled and not self.loopback and self.token is None:
            return f"the dashboard binds {self.host!r} (not loopback) and has no token"
        return None

    @property
    def loopback(self) -> bool:
        """The bind address is reachable from this machine only."""
        return is_loopback_name(self.host)


def is_loopback_name(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Destination:
    """Where results go.

    Parameters
    ----------
    type : str
        ``"cstore"`` (DICOM C-STORE SCU), ``"stow"`` (DICOMweb STOW-RS) or ``"folder"``
        (the embedded local store: ``<path>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``).
    ae_title, host, port : str, str, int
        The C-STORE peer (``cstore`` only).
    url : str
        DICOMweb root, e.g. ``http://pacs:8042/dicom-web``; instances are posted to
        ``<url>/studies`` (``stow`` only).
    path : pathlib.Path
        Folder of the local store (``folder`` only).
    query_before_resend : bool
        After a crash, ask the destination whether it already holds an instance that was
        sent without a recorded confirmation (C-FIND, QIDO-RS, file name) and send it only
        if not; False re-sends such instances unasked (at-least-once).
    storage_commitment : bool
        Ask the destination to commit what it stored (DICOM Storage Commitment Push Model,
        N-ACTION) and record its N-EVENT-REPORT, which arrives at the node's listener
        (``cstore`` only; default False).
    """

    type: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    path: Path | None = None
    query_before_resend: bool = True
    storage_commitment: bool = False

    @property
    def key(self) -> str:
        """Stable name of the destination, used to record deliveries."""
        if self.type == "cstore":
            return f"cstore:{self.ae_title}@{self.host}:{self.port}"
        if self.type == "stow":
            return f"stow:{self.url}"
        return f"folder:{self.path}"


@dataclass(frozen=True)
class NodeConfig:
    """Validated node configuration (see ``node.example.yaml`` for every key).

    Parameters
    ----------
    ae_title : str
        The node's AE title; associations must call it.
    port : int
        Listening port; 0 picks a free port (tests).
    spool_dir : pathlib.Path
        Durable spool: received studies, job folders and the job database.
    host : str
        Address to listen on.
    allowed_calling_aes : tuple of str
        Calling AE titles that may associate; empty allows all.
    stable_after_s : float
        A study is complete after this many seconds without a new instance.
    stable_after_s_by_ae : dict of str to float
        Per calling-AE override of ``stable_after_s``.
    late_instance_policy : str
        ``"reprocess"``: a new instance for a processed study opens a new job;
        ``"ignore"``: it is spooled but not processed.
    preselect_series : bool
        A stable study none of whose series the application's selection rules
        (``msk_node/config/series_rules.yaml``) would take is closed as ``skipped``
        without running the application (headers only); False: every study runs (an
        ``app_command`` that selects series by rules of its own).
    job_timeout_s : float
        The application is killed after this many seconds; the attempt fails.
    max_attempts : int
        Attempts before a job is dead (dead letter).
    retry_backoff_s : float
        Wait before the second attempt; doubles after each failure.
    max_retry_backoff_s : float
        Upper bound of the wait between attempts (also between delivery tries).
    models_dir : pathlib.Path
        The models the warm worker loads (or passed to ``app_command`` as ``-m``); default
        ``$MSK_NODE_MODELS``, ``$HOLOSCAN_MODEL_PATH``, else ``models/`` in the current directory.
    app_command : tuple of str, optional
        A one-shot command run per study (``-i IN -o OUT -m MODELS`` appended), e.g. a
        packaged MAP container; None (default): studies run in the warm worker, which
        keeps the models loaded.
    worker_memory_limit_mb : int, optional
        The warm worker is replaced when its resident memory passes this; during a
        study, that attempt fails. None: no limit.
    destinations : tuple of Destination
        Where results are sent.
    tls : TlsConfig, optional
        TLS for the listener.
    poll_interval_s : float
        How often the scheduler looks for work.
    max_associations : int
        Concurrent associations the listener accepts.
    max_associations_per_address : int
        Concurrent associations (and connections still waiting to associate) from one
        peer address; more are rejected (transient, local limit exceeded), so one noisy
        host cannot take every slot.
    artim_timeout_s : float
        A connection that sends no association request within this time is closed (the
        DICOM ARTIM timer); also how long the node waits for the peer to close after a
        reject or an abort.
    acse_timeout_s : float
        Longest wait for an association-level reply (A-ASSOCIATE-RQ, A-RELEASE-RP).
    dimse_timeout_s : float
        Longest wait for an expected DIMSE message before the association is aborted.
    network_timeout_s : float
        An established association silent for this long is aborted; also bounds each
        socket read and write.
    db_path : pathlib.Path
        SQLite job store; default ``<spool_dir>/node.sqlite``.
    dashboard : DashboardConfig
        The web dashboard (off by default).
    """

    ae_title: str
    port: int
    spool_dir: Path
    host: str = "127.0.0.1"
    allowed_calling_aes: tuple[str, ...] = ()
    stable_after_s: float = 30.0
    stable_after_s_by_ae: dict[str, float] = field(default_factory=dict)
    late_instance_policy: str = "reprocess"
    preselect_series: bool = True
    job_timeout_s: float = 3600.0
    max_attempts: int = 3
    retry_backoff_s: float = 10.0
    max_retry_backoff_s: float = 600.0
    models_dir: Path = field(default_factory=default_models_dir)
    app_command: tuple[str, ...] | None = None
    worker_memory_limit_mb: int | None = None
    destinations: tuple[Destination, ...] = ()
    tls: TlsConfig | None = None
    poll_interval_s: float = 1.0
    max_associations: int = 10
    max_associations_per_address: int = 4
    artim_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    db_path: Path | None = None
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    @property
    def database(self) -> Path:
        """Path of the SQLite job store."""
        return self.db_path if self.db_path is not None else self.spool_dir / "node.sqlite"

    def stable_after(self, calling_ae: str | None) -> float:
        """Inactivity timeout for studies sent by ``calling_ae``."""
        if calling_ae is not None and calling_ae in self.stable_after_s_by_ae:
            return self.stable_after_s_by_ae[calling_ae]
        return self.stable_after_s

    def backoff(self, failures: int) -> float:
        """Wait after the ``failures``-th consecutive failure (1, 2, ...): exponential, capped."""
        exponent = max(failures - 1, 0)
        if exponent > 60:
            return self.max_retry_backoff_s
        return min(self.retry_backoff_s * 2.0 ** exponent, self.max_retry_backoff_s)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], base_dir: Path | None = None) -> NodeConfig:
        """Validate a parsed YAML document.

        Parameters
        ----------
        document : mapping
            The parsed configuration.
        base_dir : pathlib.Path, optional
            Relative paths are resolved against this folder (the config file's folder);
            default: the current directory.

        Returns
        -------
        NodeConfig

        Raises
        ------
        ConfigError
            If a key is missing, unknown or breaks its rule; the message names the key.
        """
        return _parse(document, Path(base_dir) if base_dir is not None else Path.cwd())

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        """Read and validate a YAML configuration file.

        Parameters
        ----------
        path : str or pathlib.Path
            The YAML file. Relative paths inside it are relative to its folder.

        Returns
        -------
        NodeConfig

        Raises
        ------
        ConfigError
            If the file is not a YAML mapping or a key breaks its rule.
        FileNotFoundError
            If the file does not exist.
        """
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        try:
            return cls.from_mapping(document, path.resolve().parent)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


_TOP_KEYS = {
    "ae_title", "host", "port", "allowed_calling_aes", "spool_dir", "stable_after_s", "stable_after_s_by_ae",
    "late_instance_policy", "preselect_series", "job_timeout_s", "max_attempts", "retry_backoff_s",
    "max_retry_backoff_s", "models_dir", "app_command", "worker_memory_limit_mb", "destinations", "tls",
    "poll_interval_s", "max_associations", "max_associations_per_address", "artim_timeout_s", "acse_timeout_s",
    "dimse_timeout_s", "network_timeout_s", "db_path",
    "dashboard",
}
_DESTINATION_KEYS = {"cstore": {"type", "ae_title", "host", "port"}, "stow": {"type", "url"},
                     "folder": {"type", "path"}}
_OPTIONAL_DESTINATION_KEYS = {"cstore": {"query_before_resend", "storage_commitment"},
                              "stow": {"query_before_resend"}, "folder": {"query_before_resend"}}


def _parse(document: Any, base: Path) -> NodeConfig:
    if not isinstance(document, Mapping):
        raise ConfigError(f"the configuration must be a mapping of keys to values, got {type(document).__name__}")
    unknown = sorted(set(map(str, document)) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(repr(k) for k in unknown)}; known: {', '.join(sorted(_TOP_KEYS))}")
    for required in ("ae_title", "port", "spool_dir"):
        if document.get(required) is None:
            raise ConfigError(f"'{required}' is required")
    get = document.get
    kwargs: dict[str, Any] = {
        "ae_title": _ae_title(get("ae_title"), "ae_title"),
        "port": _port(get("port"), "port", allow_zero=True),
        "spool_dir": _path(get("spool_dir"), "spool_dir", base),
    }
    if get("host") is not None:
        kwargs["host"] = _string(get("host"), "host")
    if get("allowed_calling_aes") is not None:
        values = get("allowed_calling_aes")
        if not isinstance(values, list):
            raise ConfigError(f"'allowed_calling_aes' must be a list of AE titles, got {values!r}")
        kwargs["allowed_calling_aes"] = tuple(_ae_title(v, f"allowed_calling_aes[{i}]") for i, v in enumerate(values))
    for key in ("stable_after_s", "job_timeout_s", "retry_backoff_s", "max_retry_backoff_s", "poll_interval_s",
                "artim_timeout_s", "acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        if get(key) is not None:
            kwargs[key] = _seconds(get(key), key, allow_zero=key in ("stable_after_s", "retry_backoff_s"))
    if get("stable_after_s_by_ae") is not None:
        by_ae = get("stable_after_s_by_ae")
        if not isinstance(by_ae, Mapping):
            raise ConfigError(f"'stable_after_s_by_ae' must map calling AE titles to seconds, got {by_ae!r}")
        kwargs["stable_after_s_by_ae"] = {
            _ae_title(ae, "stable_after_s_by_ae"): _seconds(s, f"stable_after_s_by_ae.{ae}", allow_zero=True)
            for ae, s in by_ae.items()}
    if get("late_instance_policy") is not None:
        policy = get("late_instance_policy")
        if policy not in LATE_INSTANCE_POLICIES:
            raise ConfigError(f"'late_instance_policy' must be one of {', '.join(LATE_INSTANCE_POLICIES)}, got {policy!r}")
        kwargs["late_instance_policy"] = policy
    if get("preselect_series") is not None:
        if not isinstance(get("preselect_series"), bool):
            raise ConfigError(f"'preselect_series' must be true or false, got {get('preselect_series')!r}")
        kwargs["preselect_series"] = get("preselect_series")
    for key in ("max_attempts", "max_associations", "max_associations_per_address", "worker_memory_limit_mb"):
        if get(key) is not None:
            kwargs[key] = _positive_int(get(key), key)
    if get("models_dir") is not None:
        kwargs["models_dir"] = _path(get("models_dir"), "models_dir", base)
    if get("db_path") is not None:
        kwargs["db_path"] = _path(get("db_path"), "db_path", base)
    if get("app_command") is not None:
        command = get("app_command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
            raise ConfigError(f"'app_command' must be a non-empty list of strings, got {command!r}")
        kwargs["app_command"] = tuple(command)
    if get("destinations") is not None:
        destinations = get("destinations")
        if not isinstance(destinations, list):
            raise ConfigError(f"'destinations' must be a list, got {destinations!r}")
        parsed = tuple(_destination(d, f"destinations[{i}]", base) for i, d in enumerate(destinations))
        keys = [d.key for d in parsed]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise ConfigError(f"'destinations[{i}]' repeats destination {key}")
        kwargs["destinations"] = parsed
    else:
        # No PACS configured: results go to the embedded local store.
        kwargs["destinations"] = (Destination(type="folder", path=kwargs["spool_dir"] / "results"),)
    if get("tls") is not None:
        kwargs["tls"] = _tls(get("tls"), base)
    if get("dashboard") is not None:
        kwargs["dashboard"] = _dashboard(get("dashboard"))
    if kwargs.get("max_retry_backoff_s", 600.0) < kwargs.get("retry_backoff_s", 10.0):
        raise ConfigError("'max_retry_backoff_s' must not be smaller than 'retry_backoff_s'")
    return NodeConfig(**kwargs)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"'{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"'{key}' must be an AE title: 1-16 printable ASCII characters, no backslash, got {value!r}")
    return value.strip()


def _port(value: Any, key: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ConfigError(f"'{key}' must be an integer {low}-65535, got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{key}' must be a positive integer, got {value!r}")
    return value


def _seconds(value: Any, key: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return float(value)


def _path(value: Any, key: str, base: Path) -> Path:
    path = Path(_string(value, key)).expanduser()
    return path if path.is_absolute() else (base / path)


def _flag(mapping: Mapping, name: str, default: bool, key: str) -> bool:
    value = mapping.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}.{name}' must be true or false, got {value!r}")
    return value


def _destination(value: Any, key: str, base: Path) -> Destination:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{key}' must be a mapping with a 'type', got {value!r}")
    kind = value.get("type")
    if kind not in DESTINATION_TYPES:
        raise ConfigError(f"'{key}.type' must be one of {', '.join(DESTINATION_TYPES)}, got {kind!r}")
    unknown = sorted(set(map(str, value)) - _DESTINATION_KEYS[kind] - _OPTIONAL_DESTINATION_KEYS[kind])
    if unknown:
        raise ConfigError(f"'{key}' of type {kind} has unknown key(s) {', '.join(repr(k) for k in unknown)}")
    for required in sorted(_DESTINATION_KEYS[kind] - {"type"}):
        if value.get(required) is None:
            raise ConfigError(f"'{key}.{required}' is required for a {kind} destination")
    query = _flag(value, "query_before_resend", True, key)
    if kind == "cstore":
        return Destination("cstore", ae_title=_ae_title(value["ae_title"], f"{key}.ae_title"),
                           host=_string(value["host"], f"{key}.host"), port=_port(value["port"], f"{key}.port"),
                           query_before_resend=query,
                           storage_commitment=_flag(value, "storage_commitment", False, key))
    if kind == "stow":
        url = _string(value["url"], f"{key}.url").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"'{key}.url' must be an http(s) URL, got {url!r}")
        return Destination("stow", url=url, query_before_resend=query)
    return Destination("folder", path=_path(value["path"], f"{key}.path", base), query_before_resend=query)


def _tls(value: Any, base: Path) -> TlsConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'tls' must be a mapping with 'cert', 'key' and optionally 'ca', got {value!r}")
    unknown = sorted(set(map(str, value)) - {"cert", "key", "ca"})
    if unknown:
        raise ConfigError(f"'tls' has unknown key(s) {', '.join(repr(k) for k in unknown)}")
    paths: dict[str, Path | None] = {}
    for name in ("cert", "key", "ca"):
        if value.get(name) is None:
            if name != "ca":
                raise ConfigError(f"'tls.{name}' is required")
            paths[name] = None
            continue
        path = _path(value[name], f"tls.{name}", base)
        if not path.is_file():
            raise ConfigError(f"'tls.{name}' must name an existing file, got {str(path)!r}")
        paths[name] = path
    return TlsConfig(cert=paths["cert"], key=paths["key"], ca=paths["ca"])


def _dashboard(value: Any) -> DashboardConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'dashboard' must be a mapping (enabled, host, port, token, refresh_s), got {value!r}")
    unknown = sorted(set(map(str, value)) - {"enabled", "host", "port", "token", "refresh_s"})
    if unknown:
        raise ConfigError(f"'dashboard' has unknown key(s) {', '.join(repr(k) for k in unknown)}")
    kwargs: dict[str, Any] = {"enabled": _flag(value, "enabled", False, "dashboard")}
    if value.get("host") is not None:
        kwargs["host"] = _string(value["host"], "dashboard.host")
    if value.get("port") is not None:
        kwargs["port"] = _port(value["port"], "dashboard.port", allow_zero=True)
    if value.get("token") is not None:
        kwargs["token"] = _string(value["token"], "dashboard.token")
    if value.get("refresh_s") is not None:
        kwargs["refresh_s"] = _seconds(value["refresh_s"], "dashboard.refresh_s")
    try:
        return DashboardConfig(**kwargs)
    except ValueError as error:
        raise ConfigError(f"'dashboard': {error}") from None
