"""Where the image encoder runs: PyTorch eager (the reference) or OpenVINO (the fast CPU path).

The encoder is most of the node's CPU time. OpenVINO runs the same weights, converted
from the loaded PyTorch module, 2-3x faster than PyTorch eager on the CPU in fp32 and
faster again in bf16 where bf16 is native. The conversion (about 10 s) is cached on
disk, keyed by the weights' hash and the library versions, so only the first start-up
pays for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "torch")
#: The converted encoder files live here unless MSK_NODE_CACHE names another folder.
DEFAULT_CACHE = Path.home() / ".cache" / "msk-node"


class ImageEncoder(Protocol):
    #: "torch" or "openvino".
    backend: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a (1, 3, H, W) float image batch."""


class TorchEncoder:
    """The PyTorch module itself, under bf16 autocast when asked for."""

    backend = "torch"

    def __init__(self, module: torch.nn.Module, precision: str) -> None:
        self.module = module
        self.precision = precision

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(pixels.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with torch.inference_mode(), autocast:
            return self.module(pixels).float()


class OpenVinoEncoder:
    """The module converted to OpenVINO once, compiled for this CPU at ``precision``."""

    backend = "openvino"

    def __init__(self, module: torch.nn.Module, precision: str, input_shape: tuple[int, ...],
                 cache_dir: Path | None = None) -> None:
        import openvino as ov

        model_path = converted_model(module, input_shape, cache_dir or cache_folder())
        self.model = ov.Core().compile_model(str(model_path), "CPU", {
            # OpenVINO would pick bf16 on its own where native; the precision is ours to choose.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        })
        self.request = self.model.create_infer_request()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        result = self.request.infer(pixels.detach().cpu().numpy().astype(np.float32, copy=False))
        return torch.from_numpy(np.array(result[0], copy=True))


def cache_folder() -> Path:
    return Path(os.environ.get("MSK_NODE_CACHE", DEFAULT_CACHE))


def module_digest(module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """SHA-256 of the weights, the input shape and the library versions a conversion depends on."""
    import openvino

    digest = hashlib.sha256(f"{input_shape} torch {torch.__version__} openvino {openvino.__version__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def converted_model(module: torch.nn.Module, input_shape: tuple[int, ...], cache_dir: Path) -> Path:
    """The module as OpenVINO IR in ``cache_dir``, converted now unless a conversion of the same weights is there.

    The IR is written to a private folder and renamed into place, so concurrent start-ups
    never read a half-written model. A folder that cannot be written falls back to a
    temporary one (converted at every start).
    """
    import openvino as ov

    target = cache_dir / f"encoder-{module_digest(module, input_shape)[:16]}"
    if (target / "encoder.xml").is_file():
        return target / "encoder.xml"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".partial-"))
    except OSError as error:
        logger.warning("encoder cache %s is not writable (%s); converting into a temporary folder", cache_dir, error)
        staging = Path(tempfile.mkdtemp(prefix="msk-node-encoder-"))
        target = staging
    logger.info("converting the image encoder for OpenVINO into %s (once per model and library version)",
                cache_dir)
    with torch.inference_mode():
        program = torch.export.export(module.eval(), (torch.zeros(input_shape),))
    # fp16 weight compression would change the fp32 results; keep the weights as they are.
    ov.save_model(ov.convert_model(program), staging / "encoder.xml", compress_to_fp16=False)
    if staging != target:
        try:
            staging.rename(target)
        except OSError:  # another process put the same conversion there first
            shutil.rmtree(staging, ignore_errors=True)
    return target / "encoder.xml"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def build_encoder(module: torch.nn.Module, backend: str, precision: str, input_shape: tuple[int, ...],
                  device: torch.device) -> ImageEncoder:
    """The encoder on ``backend``; ``auto`` takes OpenVINO on the CPU where it is installed, else PyTorch.

    Raises
    ------
    ValueError
        For an unknown backend, or OpenVINO asked for on a non-CPU device or without the package.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if backend == "torch":
        return TorchEncoder(module, precision)
    if device.type != "cpu":
        raise ValueError(f"backend openvino runs on the CPU; device is {device}")
    if not openvino_available():
        raise ValueError("backend openvino needs the 'openvino' package (pip install openvino)")
    return OpenVinoEncoder(module, precision, input_shape)
