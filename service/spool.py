"""The durable spool: every received instance on disk before the sender hears success.

Layout under the spool folder::

    studies/<StudyInstanceUID>/<SOPInstanceUID>.dcm   received instances
    tmp/                                              partial writes (same file system)
    jobs/<job id>/attempt-<k>/{input,output,app.log}  one folder per processing attempt

An instance is written to ``tmp/``, flushed and fsynced, renamed into its study folder
and the folder is fsynced, so a crash leaves either the old file or the new one, and a
study folder never holds a partial file. A second instance with the same SOP Instance
UID replaces the first.

Everything here is patient data: the node creates its folders ``0700`` and its files
``0600`` with explicit modes, and runs the application with umask ``077`` (see
:data:`APP_UMASK`), rather than changing the umask of the whole process, which may
hold other code (tests, a host program) writing files of its own.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: Modes of what the node writes, and the umask of the application processes it starts.
DIR_MODE = 0o700
FILE_MODE = 0o600
APP_UMASK = 0o077

#: A DICOM UID: dot-separated numbers, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (safe as a file name)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def private_dir(path: Path, parents: bool = False) -> Path:
    """Create ``path`` (mode 0700, and so its missing parents with ``parents``) unless it exists; returns it."""
    if parents and not path.parent.exists():
        private_dir(path.parent, parents=True)
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    return path


def open_private(path: Path, exclusive: bool = False):
    """Open ``path`` for binary writing, created with mode 0600 (truncated if it exists)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, FILE_MODE), "wb")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Received studies and job folders under one root.

    Parameters
    ----------
    root : pathlib.Path
        Spool folder; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.tmp = self.root / "tmp"
        self.jobs = self.root / "jobs"
        private_dir(self.root, parents=True)
        if stat.S_IMODE(self.root.stat().st_mode) & 0o077:  # a spool from before modes were set
            try:
                os.chmod(self.root, DIR_MODE)
            except OSError as error:
                logger.warning("spool %s is readable by others and cannot be made private: %s", self.root, error)
        for folder in (self.studies, self.tmp, self.jobs):
            private_dir(folder)

    def study_dir(self, study_uid: str) -> Path:
        """Folder of one study; :class:`ValueError` for a UID that is not one."""
        if not is_valid_uid(study_uid):
            raise ValueError(f"study_uid must be a DICOM UID, got {study_uid!r}")
        return self.studies / study_uid

    def write_instance(self, ds: Dataset) -> Path:
        """Store one received instance durably, in the transfer syntax it arrived in.

        Parameters
        ----------
        ds : pydicom.dataset.Dataset
            The instance with its ``file_meta`` (as received: the Transfer Syntax UID is
            the accepted presentation context's).

        Returns
        -------
        pathlib.Path
            ``studies/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.

        Raises
        ------
        ValueError
            If StudyInstanceUID or SOPInstanceUID is missing or not a valid UID, or the
            dataset cannot be encoded as a DICOM file.
        OSError
            If the disk write fails (full disk, permissions).
        """
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not is_valid_uid(study_uid):
            raise ValueError(f"StudyInstanceUID must be a DICOM UID, got {study_uid!r}")
        if not is_valid_uid(sop_uid):
            raise ValueError(f"SOPInstanceUID must be a DICOM UID, got {sop_uid!r}")
        folder = private_dir(self.studies / study_uid)
        target = folder / f"{sop_uid}.dcm"
        temp = self.tmp / f"{sop_uid}.{uuid.uuid4().hex}.part"
        try:
            with open_private(temp, exclusive=True) as handle:
                ds.save_as(handle, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(folder)
        return target

    def instance_files(self, study_uid: str) -> list[Path]:
        """The study's stored instances, sorted by name."""
        folder = self.study_dir(study_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def new_attempt_dir(self, job_id: int) -> Path:
        """A fresh folder for one processing attempt: ``jobs/<id>/attempt-<k>``, ``k``
        one more than any before, so earlier attempts' logs and results are kept."""
        job_dir = private_dir(self.jobs / str(int(job_id)))
        numbers = [int(p.name.split("-", 1)[1]) for p in job_dir.glob("attempt-*") if p.name.split("-", 1)[1].isdigit()]
        folder = job_dir / f"attempt-{max(numbers, default=0) + 1}"
        folder.mkdir(mode=DIR_MODE)
        return folder

    def snapshot_study(self, study_uid: str, target: Path) -> int:
        """Freeze the study's current instances into ``target`` for one run.

        Hard links (a copy where the file system refuses them): instances that arrive,
        or replace others, while the application runs do not change its input.

        Returns
        -------
        int
            Number of instances in the snapshot.
        """
        private_dir(target, parents=True)
        files = self.instance_files(study_uid)
        for source in files:
            destination = target / source.name
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)
        return len(files)

    def clean_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many were removed."""
        removed = 0
        for leftover in self.tmp.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
