"""On-disk store of frozen-encoder features: stage 1 of the SAMRI two-stage recipe.

Layout::

    meta.json        family, model, encoder fingerprint, input size, array shapes; written last
    index.parquet    one row per slice: dataset, subject, split, slice_index, image_file, row
    <array>.npy      float16 (N, C, h, w), one row per slice (LiteMedSAM/SAM: image_embed;
                     SAM2 also high_res_0 and high_res_1)

Rows are read with positioned file reads rather than a memory map, so a training
process holds only the rows of its current batch, however large the store.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msk_node.progress import progress
from msk_node_training.finetune_data import load_stored

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ("dataset", "subject", "split", "slice_index", "image_file")
_KEY = ["dataset", "subject", "slice_index"]
_DTYPE = np.dtype("<f2")


def write_store(model, data_dir: Path, table: pd.DataFrame, out_dir: Path, *, device: torch.device,
                batch_size: int = 8, autocast: contextlib.AbstractContextManager | None = None) -> Path:
    """Encode every slice of ``table`` once with ``model``'s frozen encoder into a store at ``out_dir``.

    ``model`` is a :class:`msk_node_training.sam_family.PromptedModel`.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"embedding store folder {out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table.reset_index(drop=True)
    files: dict[str, object] = {}
    shapes: dict[str, list[int]] = {}
    try:
        for start in progress(range(0, len(table), batch_size), "embedding", "batch"):
            images = [torch.from_numpy(load_stored(data_dir, row, "image", model.frame))
                      for _, row in table.iloc[start:start + batch_size].iterrows()]
            with torch.inference_mode(), autocast or contextlib.nullcontext():
                features = model.encode(model.prepare(torch.stack(images).to(device)))
            for name, value in features.items():
                if name not in files:
                    shapes[name] = list(value.shape[1:])
                    files[name] = (out_dir / f"{name}.npy").open("wb")
                    header = {"descr": _DTYPE.str, "fortran_order": False, "shape": (len(table), *shapes[name])}
                    np.lib.format.write_array_header_1_0(files[name], header)
                files[name].write(value.float().cpu().numpy().astype(_DTYPE).tobytes())
            logger.info("embedded %d/%d slices", min(start + batch_size, len(table)), len(table))
    finally:
        for handle in files.values():
            handle.close()
    index = table[list(INDEX_COLUMNS)].copy()
    index["row"] = np.arange(len(table))
    index.to_parquet(out_dir / "index.parquet", index=False)
    meta = {"family": model.family, "input_size": model.input_size, "encoder_sha256": model.feature_fingerprint(),
            "data": str(Path(data_dir).resolve()), "dtype": "float16", "count": len(table), "arrays": shapes}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir


class EmbeddingStore:
    """Read side of a store written by :func:`write_store`.

    Raises
    ------
    FileNotFoundError
        If ``folder`` has no ``meta.json`` (no store, or an embedding run that did not finish).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a complete embedding store (no meta.json); "
                                    "run msk-train embed")
        self.meta = json.loads(meta_path.read_text())
        self.index = pd.read_parquet(self.folder / "index.parquet")
        self._layout = {}
        for name, shape in self.meta["arrays"].items():
            path = self.folder / f"{name}.npy"
            with path.open("rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                stored_shape, _, dtype = read_header(handle)
                offset = handle.tell()
            if dtype != _DTYPE or list(stored_shape[1:]) != shape:
                raise ValueError(f"{path}: expected float16 rows of shape {shape}, found {dtype} {stored_shape}")
            self._layout[name] = (path, offset, tuple(shape), int(np.prod(shape)) * _DTYPE.itemsize)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def rows_of(self, table: pd.DataFrame) -> np.ndarray:
        """Store row of each slice of ``table``.

        Raises
        ------
        ValueError
            If a slice is not in the store.
        """
        merged = table[_KEY].merge(self.index[_KEY + ["row"]], on=_KEY, how="left")
        missing = merged[merged["row"].isna()]
        if len(missing):
            first = missing.iloc[0]
            raise ValueError(f"embedding store {self.folder} lacks {len(missing)} slice(s), e.g. "
                             f"{first['dataset']}/{first['subject']}/{first['slice_index']}; run msk-train embed")
        return merged["row"].to_numpy(dtype=np.int64)

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """One slice's features as float32 tensors."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside the store's {len(self)} rows")
        features = {}
        for name, (path, offset, shape, nbytes) in self._layout.items():
            with path.open("rb") as handle:
                handle.seek(offset + row * nbytes)
                data = handle.read(nbytes)
            features[name] = torch.from_numpy(np.frombuffer(data, dtype=_DTYPE).reshape(shape).astype(np.float32))
        return features
