#!/usr/bin/env bash
# Create .venv with the pinned msk-node stack; with --test also install the
# tools the test suite checks our output with (Debian dcmtk, dicom3tools and
# pixelmed-apps for DicomSRValidator; dcmqi from PyPI for tid1500reader) and the
# Orthanc PACS with its DICOMweb and Python plugins (tests/test_orthanc.py), and Debian's
# Chromium that tests/test_dashboard.py drives through Playwright (its own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."

with_test_tools=0
[[ "${1:-}" == "--test" ]] && with_test_tools=1

missing_tools=0
for tool in dciodvfy storescu DicomSRValidator Orthanc chromium; do command -v "$tool" >/dev/null || missing_tools=1; done
[[ -f /usr/share/orthanc/plugins/libOrthancPython.so ]] || missing_tools=1
if [[ $with_test_tools == 1 ]] && [[ $missing_tools == 1 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        dicom3tools dcmtk pixelmed-apps orthanc orthanc-dicomweb orthanc-python chromium >/dev/null
fi

if [[ ! -f .venv/.msk-node-installed ]] || [[ packaging/requirements.txt -nt .venv/.msk-node-installed ]] || [[ pyproject.toml -nt .venv/.msk-node-installed ]]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q pip==26.3
    .venv/bin/python -m pip install -q -r packaging/requirements.txt -c packaging/constraints.txt
    # sam2 ships only as an sdist: build it against the torch above, without its CUDA extension.
    SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation sam2==1.1.0 -c packaging/constraints.txt
    # ultralytics pulls the GUI OpenCV into the same cv2 folder; make the headless build win.
    .venv/bin/python -m pip install -q --force-reinstall --no-deps opencv-python-headless==5.0.0.93
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    touch .venv/.msk-node-installed
fi

if [[ $with_test_tools == 1 ]] && [[ ! -x .venv/bin/tid1500reader ]]; then
    .venv/bin/python -m pip install -q dcmqi==1.5.7
fi
