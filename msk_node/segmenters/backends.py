"""Where LiteMedSAM runs: PyTorch eager (the reference) or OpenVINO (the fast CPU path).

The image encoder is most of the node's CPU time, the box decoder most of the rest.
OpenVINO runs the same weights, converted from the loaded PyTorch modules: measured on
2-core EPYCs, the encoder 2-3x faster than PyTorch eager in fp32 and faster again in
bf16 where bf16 is native, the decoder about 1.4x faster. A conversion (about 10 s per
module) is cached on disk, keyed by the weights and the library versions, so only the
first start-up pays for it.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msk_node.segmenters.base import box_prompt_decode

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "torch")
#: The converted models live here unless MSK_NODE_CACHE names another folder.
DEFAULT_CACHE = Path.home() / ".cache" / "msk-node"
#: Boxes one decoder call may take (the most any series has on one slice is a few dozen).
MAX_BOXES = 256


class BoxDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder of a SAM-style model as one module: (features, boxes) -> (logits, IoUs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return box_prompt_decode(self, features, boxes)


class TorchRunner:
    """A PyTorch module run as it is, under bf16 autocast when asked for."""

    backend = "torch"

    def __init__(self, module: torch.nn.Module, precision: str = "fp32") -> None:
        self.module = module.eval()
        self.precision = precision

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        with torch.inference_mode(), autocast:
            outputs = self.module(*inputs)
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()


class OpenVinoRunner:
    """A module converted to OpenVINO once, compiled for this CPU at ``precision``."""

    backend = "openvino"

    def __init__(self, module: torch.nn.Module, example: tuple[torch.Tensor, ...], precision: str = "fp32",
                 dynamic_shapes: Any = None, cache_dir: Path | None = None) -> None:
        import openvino as ov

        model_path = converted_model(module, example, dynamic_shapes, cache_dir or cache_folder())
        self.model = ov.Core().compile_model(str(model_path), "CPU", {
            # OpenVINO would pick bf16 on its own where native; the precision is ours to choose.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        })
        self.request = self.model.create_infer_request()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        arrays = [tensor.detach().cpu().numpy().astype(np.float32, copy=False) for tensor in inputs]
        results = self.request.infer(arrays)
        outputs = tuple(torch.from_numpy(np.array(results[i], copy=True)) for i in range(len(self.model.outputs)))
        return outputs if len(outputs) > 1 else outputs[0]


def cache_folder() -> Path:
    return Path(os.environ.get("MSK_NODE_CACHE", DEFAULT_CACHE))


def module_digest(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> str:
    """SHA-256 of the module's class, forward code, weights and input shapes, and of the library versions a
    conversion depends on."""
    import openvino

    shapes = [tuple(tensor.shape) for tensor in example]
    digest = hashlib.sha256(f"{type(module).__qualname__} {shapes} torch {torch.__version__} "
                            f"openvino {openvino.__version__}".encode())
    digest.update(inspect.getsource(type(module).forward).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def converted_model(module: torch.nn.Module, example: tuple[torch.Tensor, ...], dynamic_shapes: Any,
                    cache_dir: Path) -> Path:
    """The module as OpenVINO IR in ``cache_dir``, converted now unless a conversion of the same weights is there.

    The IR is written to a private folder and renamed into place, so concurrent start-ups
    never read a half-written model. A folder that cannot be written falls back to a
    temporary one (converted at every start).
    """
    import openvino as ov

    name = type(module).__name__.lower()
    target = cache_dir / f"{name}-{module_digest(module, example)[:16]}"
    if (target / "model.xml").is_file():
        return target / "model.xml"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".partial-"))
    except OSError as error:
        logger.warning("model cache %s is not writable (%s); converting into a temporary folder", cache_dir, error)
        staging = Path(tempfile.mkdtemp(prefix="msk-node-model-"))
        target = staging
    logger.info("converting %s for OpenVINO into %s (once per model and library version)", name, cache_dir)
    try:
        with torch.inference_mode():
            program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes)
        # fp16 weight compression would change the fp32 results; keep the weights as they are.
        ov.save_model(ov.convert_model(program), staging / "model.xml", compress_to_fp16=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if staging != target:
        try:
            staging.rename(target)
        except OSError:  # another process put the same conversion there first
            shutil.rmtree(staging, ignore_errors=True)
    return target / "model.xml"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is OpenVINO on the CPU where it is installed, PyTorch otherwise.

    Raises
    ------
    ValueError
        For an unknown backend, or OpenVINO asked for on a non-CPU device or without the package.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"backend openvino runs on the CPU; device is {device}")
    if backend == "openvino" and not openvino_available():
        raise ValueError("backend openvino needs the 'openvino' package (pip install openvino)")
    return backend


def build_encoder(module: torch.nn.Module, backend: str, precision: str, input_size: int) -> TorchRunner | OpenVinoRunner:
    """The image encoder on a resolved ``backend``: (1, 3, size, size) image -> features."""
    if backend == "torch":
        return TorchRunner(module, precision)
    return OpenVinoRunner(module, (torch.zeros(1, 3, input_size, input_size),), precision)


def build_decoder(model: torch.nn.Module, backend: str, features_shape: tuple[int, ...]) -> TorchRunner | OpenVinoRunner:
    """Prompt encoder + mask decoder on a resolved ``backend``, always fp32: (features, boxes (n, 1, 4)) -> (logits,
    predicted IoUs).

    Thin structures change under bf16, and the decoder is cheap enough in fp32.
    """
    decoder = BoxDecoder(model)
    if backend == "torch":
        return TorchRunner(decoder)
    boxes = torch.export.Dim("boxes", min=1, max=MAX_BOXES)
    example = (torch.zeros(features_shape), torch.tensor([[[0.0, 0.0, 64.0, 64.0]], [[8.0, 8.0, 128.0, 128.0]]]))
    return OpenVinoRunner(decoder, example, "fp32", dynamic_shapes={"features": None, "boxes": {0: boxes}})
