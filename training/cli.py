"""``msk-train``: the research framework's command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

#: The real data the default models are trained on (knee label maps, real spine cases).
REAL_DATA = Path(__file__).resolve().parent / "configs" / "real_data.yaml"


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
    synthesizing = commands.add_parser(
        "synthesize", help="synthetic knee MRI from real label maps: DICOM series with exact truth, like phantoms")
    synthesizing.add_argument("--out", type=Path, required=True, help="folder; one case folder per label map and case")
    synthesizing.add_argument("--cases", type=int, default=1, help="cases per label map (default 1)")
    synthesizing.add_argument("--seed", type=int, default=0)
    synthesizing.add_argument("--real-data", type=Path, default=REAL_DATA,
                              help=f"real data file naming the label maps (default {REAL_DATA})")
    holding_out = commands.add_parser(
        "leave-one-map-out",
        help="per-label Dice on synthetic knees of each label map, decoder finetuned on the others")
    holding_out.add_argument("config", type=Path, help="a segmenter config with real_data")
    holding_out.add_argument("--per-map", type=int, default=4, help="synthetic knees per label map (default 4)")
    holding_out.add_argument("--steps", type=int, default=600, help="finetuning steps per fold (default 600)")
    preprocessing = commands.add_parser(
        "preprocess", help="labelled MRI (DICOM or NIfTI) -> normalised slices, masks, YOLO labels, Parquet tables")
    preprocessing.add_argument("config", type=Path)
    preprocessing.add_argument("--out", type=Path, help="output folder (default: the config's 'output')")
    finetuning = commands.add_parser(
        "finetune", help="finetune a SAM-family segmenter on preprocessed slices (also under torchrun)")
    finetuning.add_argument("config", type=Path)
    finetuning.add_argument("--run-dir", type=Path, help="run folder (default: the config's 'run_dir')")
    embedding = commands.add_parser("embed", help="run the frozen encoder once over the slices into a store")
    embedding.add_argument("config", type=Path)
    embedding.add_argument("--out", type=Path, help="store folder (default: the config's 'embeddings')")
    exporting = commands.add_parser("export", help="a finetuning run -> the node's segmenter model folder")
    exporting.add_argument("run", type=Path)
    exporting.add_argument("--to", type=Path, required=True, help="models folder; writes <TO>/segmenter")
    exporting.add_argument("--checkpoint", choices=("best", "last"), default="best")
    bench = commands.add_parser(
        "bench-training", help="seconds per epoch, encoder in the loop vs cached embeddings, and peak memory (JSON)")
    bench.add_argument("config", type=Path)
    bench.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "detector":
        from msk_node_training.detector import export_detector, load_detector_config, train_detector

        config = load_detector_config(args.config)
        best = train_detector(config, args.run_dir)
        print(f"trained: {best}")
        if args.export:
            print(f"exported: {export_detector(best, config, args.config, args.export)}")
    if args.command == "segmenter":
        from msk_node_training.segmenter import export_segmenter, load_segmenter_config, train_segmenter

        config = load_segmenter_config(args.config)
        model, losses = train_segmenter(config)
        window = max(1, len(losses) // 10)
        print(f"loss: first {np.mean(losses[:window]):.4f}, last {np.mean(losses[-window:]):.4f}")
        if args.export:
            print(f"exported: {export_segmenter(model, config, args.config, args.export)}")
    if args.command == "leave-one-map-out":
        from msk_node_training.segmenter import leave_one_label_map_out, load_segmenter_config

        config = load_segmenter_config(args.config)
        if not config.real_data:
            parser.error(f"{args.config}: 'real_data' must name the knee label maps")
        print(json.dumps(leave_one_label_map_out(config, args.per_map, args.steps), indent=2))
    if args.command == "synthesize":
        from msk_node.labels import DEFAULT_LABEL_MAP_PATH, load_label_map
        from msk_node.progress import progress
        from msk_node_training.sources import load_real_data
        from msk_node_training.synthetic import write_synthetic

        label_map = load_label_map(DEFAULT_LABEL_MAP_PATH)
        sources = load_real_data(args.real_data).knee_label_maps
        jobs = [(source, case) for case in range(args.cases) for source in sources]
        for index, (source, case) in enumerate(progress(jobs, "synthesizing knees", "case")):
            folder = args.out / f"{source.path.name.split('.')[0]}-{case:03d}"
            write_synthetic(source, label_map, folder, seed=args.seed + index)
            print(f"written: {folder}")
    if args.command == "preprocess":
        from msk_node_training.preprocess import load_preprocess_config, preprocess

        config = load_preprocess_config(args.config)
        print(f"preprocessed: {preprocess(config, args.out)}")
    if args.command == "finetune":
        from msk_node_training.finetune import finetune, load_finetune_config, result_json

        result = finetune(load_finetune_config(args.config), args.run_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            print(result_json(result))
    if args.command == "embed":
        from msk_node_training.finetune import embed, load_finetune_config

        print(f"embedded: {embed(load_finetune_config(args.config), args.out)}")
    if args.command == "export":
        from msk_node_training.finetune import export_run

        print(f"exported: {export_run(args.run, args.to, args.checkpoint)}")
    if args.command == "bench-training":
        from msk_node_training.bench_training import bench_training

        print(json.dumps(bench_training(args.config, args.epochs), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
