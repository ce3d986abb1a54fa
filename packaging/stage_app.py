"""Assemble the application folder that ``monai-deploy package`` turns into the MAP.

    python packaging/stage_app.py [OUT]        # default: build/map-app

The packager copies one folder to ``/opt/holoscan/app``, starts it as
``python3 /opt/holoscan/app`` and pip-installs the ``requirements.txt`` it finds in it.
The application needs three packages of this repository, so OUT receives::

    __main__.py        packaging/app_main.py: runs ``msk_node_app`` as ``python -m msk_node_app``
    requirements.txt   packaging/requirements-runtime.txt (the node and the application, no
                       training, evaluation or test packages), then the pins of
                       packaging/constraints.txt of every package those depend on (read from the
                       installed distributions), so the image gets .venv's versions of that set
    msk_node_app/ msk_node_operators/ msk_node/   the sources (no bytecode), under their installed
                       names (app/ and operators/ of the repository are installed as msk_node_app
                       and msk_node_operators)

Packaging ``app/`` directly does not work: started as a folder, ``app/app.py`` shadows the
package and ``msk_node_operators``/``msk_node`` are missing. ``--add`` does not help either:
it puts every subfolder on PYTHONPATH, where ``msk_node/segmenters/sam2.py`` would shadow
the ``sam2`` package.
"""
from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
#: ``{installed name: folder of the repository}`` of the packages the application imports
PACKAGES = {"msk_node_app": "app", "msk_node_operators": "operators", "msk_node": "msk_node"}
#: ``name==version`` or ``name[extras]==version``
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a requirements file."""
    return read_pins_text(path.read_text())


def read_pins_text(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of requirements text."""
    pins = {}
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def dependency_closure(names: set[str]) -> set[str]:
    """Canonical names of ``names`` and everything they require (with the extras asked for), as the
    installed distributions declare it."""
    closure: set[str] = set()
    pending = [(name, frozenset()) for name in names]
    while pending:
        name, extras = pending.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras or {""}):
                pending.append((canonical(requirement.name), frozenset(requirement.extras)))
    return closure


def image_requirements(repo: Path = REPO) -> str:
    """requirements.txt of the image: the runtime pins verbatim, then the resolved pins they depend on."""
    runtime = repo / "packaging" / "requirements-runtime.txt"
    named = read_pins(runtime)
    needed = dependency_closure(set(named))
    resolved = [line.strip() for line in (repo / "packaging" / "constraints.txt").read_text().splitlines()
                if PIN.match(line) and canonical(PIN.match(line).group(1)) in needed - set(named)]
    return (runtime.read_text().rstrip("\n") + "\n\n# What those depend on, pinned as in packaging/constraints.txt: "
            "pip in the image\n# reads only this file, so the constraints are installed as pins.\n"
            + "\n".join(resolved) + "\n")


def stage(out: Path, repo: Path = REPO) -> Path:
    """Write the application folder to ``out`` (replacing it) and return ``out``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(repo / "packaging" / "app_main.py", out / "__main__.py")
    (out / "requirements.txt").write_text(image_requirements(repo))
    for name, folder in PACKAGES.items():
        shutil.copytree(repo / folder, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


if __name__ == "__main__":
    target = stage(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "map-app")
    print(target)
