"""``msk-train``: the research framework's command line."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msk-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    detector = commands.add_parser("detector", help="train the YOLO anatomy detector on phantoms")
    detector.add_argument("config", type=Path)
    detector.add_argument("--run-dir", type=Path, default=Path("runs/detector"))
    detector.add_argument("--export", type=Path, help="node model folder to write (e.g. models/detector)")
    segmenter = commands.add_parser("segmenter", help="finetune the LiteMedSAM decoder on phantoms (cached embeddings)")
    segmenter.add_argument("config", type=Path)
    segmenter.add_argument("--export", type=Path, help="node model folder to write (e.g. models/segmenter)")
    preprocessing = commands.add_parser(
        "preprocess", help="labelled MRI (DICOM or NIfTI) -> normalised slices, masks, YOLO labels, Parquet tables")
    preprocessing.add_argument("config", type=Path)
    preprocessing.add_argument("--out", type=Path, help="output folder (default: the config's 'output')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "detector":
        from training.detector import export_detector, load_detector_config, train_detector

        config = load_detector_config(args.config)
        best = train_detector(config, args.run_dir)
        print(f"trained: {best}")
        if args.export:
            print(f"exported: {export_detector(best, config, args.config, args.export)}")
    if args.command == "segmenter":
        from training.segmenter import export_segmenter, load_segmenter_config, train_segmenter

        config = load_segmenter_config(args.config)
        model, losses = train_segmenter(config)
        window = max(1, len(losses) // 10)
        print(f"loss: first {np.mean(losses[:window]):.4f}, last {np.mean(losses[-window:]):.4f}")
        if args.export:
            print(f"exported: {export_segmenter(model, config, args.config, args.export)}")
    if args.command == "preprocess":
        from training.preprocess import load_preprocess_config, preprocess

        config = load_preprocess_config(args.config)
        print(f"preprocessed: {preprocess(config, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
