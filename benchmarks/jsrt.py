"""JSRT/SCR accuracy: train on part of a JSRT/SCR folder, score the held-out
part at the masks' native resolution (1024x1024, 0.35 mm).

    .venv/bin/python benchmarks/jsrt.py --data-root ../shared/data/jsrt-scr-fold1

Prints Jaccard and Dice per structure (heart, lungs = left + right, clavicles
= left + right) on the held-out cases, next to published figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.ingest import ReadOptions
from medseg.ingest.masks import read_scr_masks
from medseg.preprocessing.geometry import ResizePadGeometry, to_original
from medseg.preprocessing.manifest import read_manifest
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
from medseg.preprocessing.splits import make_splits, write_splits
from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES, label_masks
from medseg.training.data import load_cases
from medseg.training.network import NetworkSpec, build_network
from medseg.training.run import TrackingTarget, train_fold
from medseg.training.settings import TrainSettings

# Jaccard (lungs, heart, clavicles) as published on JSRT/SCR.
PUBLISHED = {
    "human observer (van Ginneken 2006)": (0.946, 0.878, 0.896),
    "Novikov et al. 2018": (0.950, 0.882, 0.868),
    "Frid-Adar et al. 2018": (0.961, 0.906, 0.855),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/jsrt-scr-fold1")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples-per-epoch", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--holdout-fold", type=int, default=0, help="which of 5 folds is held out")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="keep outputs here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out = args.out or Path(tempfile.mkdtemp(prefix="medseg-jsrt-"))
    start = time.perf_counter()
    spec = DatasetSpec(images=args.data_root / "images", masks_root=args.data_root / "masks",
                       read_options=ReadOptions(invert=True, pixel_spacing_mm=0.35))
    pre = preprocess_dataset(spec, PreprocessSettings(size=args.size), out / "pre", workers=2)
    if pre.failures:
        raise SystemExit(f"preprocessing failed for {len(pre.failures)} files: {pre.failures[:3]}")
    ids = [r["case_id"] for r in pre.rows]
    splits = make_splits(ids, "kfold", k=5, seed=0, val_fraction=0.1)
    write_splits(out / "splits.json", splits)
    fold = splits["folds"][args.holdout_fold]

    settings = TrainSettings(preset=args.preset, epochs=args.epochs, samples_per_epoch=args.samples_per_epoch,
                             batch_size=args.batch_size, learning_rate=args.learning_rate, device=args.device,
                             label_weights={"clavicles": 2.0}, overlay_every=10)
    target = TrackingTarget(f"sqlite:///{(out / 'mlflow.db').resolve()}", "jsrt-benchmark", "medseg-jsrt-benchmark")
    summary = train_fold(settings=settings, labels=DEFAULT_LABELS, manifest=pre.manifest_path,
                         splits=out / "splits.json", fold=args.holdout_fold, out_dir=out / "model", target=target,
                         params={"benchmark": "jsrt", **{k: str(v) for k, v in vars(args).items()}})
    train_seconds = time.perf_counter() - start

    # Score the held-out cases at the SCR masks' native resolution.
    state = torch.load(out / "model" / "best.pt", map_location="cpu", weights_only=False)
    net = build_network(NetworkSpec(settings.network, settings.preset, settings.upsample,
                                    out_channels=len(DEFAULT_LABELS)))
    net.load_state_dict(state["model"])
    net.eval()
    manifest = read_manifest(pre.manifest_path).set_index("case_id")
    test = load_cases(pre.manifest_path, fold["test"], DEFAULT_LABELS)
    scores = {name: {"jaccard": [], "dice": []} for name in DEFAULT_LABELS}
    with torch.no_grad():
        probabilities = torch.sigmoid(torch.cat([net(test.images[i:i + 8]) for i in range(0, len(test.images), 8)]))
    for case_id, prob in zip(test.case_ids, probabilities.numpy()):
        geometry = ResizePadGeometry.from_record(manifest.loc[case_id].to_dict())
        native = to_original(prob, geometry) >= 0.5  # (C, 1024, 1024)
        masks, _ = read_scr_masks(args.data_root / "masks", case_id, SCR_STRUCTURES, case_id)
        truths = label_masks(masks, DEFAULT_LABELS)
        for c, label in enumerate(DEFAULT_LABELS):
            truth = truths[label]
            inter = np.logical_and(native[c], truth).sum()
            union = np.logical_or(native[c], truth).sum()
            scores[label]["jaccard"].append(inter / union if union else 1.0)
            scores[label]["dice"].append(2 * inter / (native[c].sum() + truth.sum()) if union else 1.0)

    print(f"\nJSRT/SCR {args.data_root.name}: {len(fold['train'])} train, {len(fold['val'])} val, "
          f"{len(fold['test'])} held-out test cases; {args.size}px, {settings.preset}, {args.epochs} epochs, "
          f"device {'cuda' if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'}, "
          f"preprocess+train {train_seconds:.0f} s")
    print(f"{'structure':<10} {'Jaccard':>16} {'Dice':>16}   (held-out, scored at 1024x1024)")
    for label in DEFAULT_LABELS:
        j, d = np.array(scores[label]["jaccard"]), np.array(scores[label]["dice"])
        print(f"{label:<10} {j.mean():.3f} +- {j.std():.3f} {d.mean():.3f} +- {d.std():.3f}")
    print("\npublished Jaccard (lungs / heart / clavicles):")
    for who, (lungs, heart, clav) in PUBLISHED.items():
        print(f"  {who:<36} {lungs:.3f} / {heart:.3f} / {clav:.3f}")
    ours = [np.mean(scores[k]["jaccard"]) for k in ("lungs", "heart", "clavicles")]
    print(f"  {'medseg (this run)':<36} {ours[0]:.3f} / {ours[1]:.3f} / {ours[2]:.3f}")
    (out / "jsrt_scores.json").write_text(json.dumps(scores, default=float, indent=1))
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
