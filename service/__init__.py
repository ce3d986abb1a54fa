"""The PACS node service: DICOM listener, durable spool, job store, scheduler, senders.

No MONAI Deploy import: studies run in a warm worker process that keeps the models
loaded, or in a one-shot ``app_command`` subprocess per study.
"""
from msk_node_service.config import ConfigError, Destination, NodeConfig, TlsConfig
from msk_node_service.jobs import Job, JobStore
from msk_node_service.node import Node, association_health, release, retry, status
from msk_node_service.spool import Spool

__all__ = [
    "ConfigError",
    "Destination",
    "Job",
    "JobStore",
    "Node",
    "NodeConfig",
    "Spool",
    "TlsConfig",
    "association_health",
    "release",
    "retry",
    "status",
]
