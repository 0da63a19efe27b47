"""JSRT/SCR accuracy of a training recipe, by cross-validation inside one SCR fold.

    .venv/bin/python benchmarks/jsrt.py --config config/jsrt-cpu.yaml --folds 1 2 3
    .venv/bin/python benchmarks/jsrt.py --config config/jsrt-cpu.yaml --folds 0 \\
        --set train.learning_rate=0.003 --name lr3e-3        # one lever, on the tuning fold

For each held-out fold: train on the others (the product's ``train_fold``,
resuming from ``last.pt``), predict the held-out radiographs with the
product's prediction path (``predict_files``: threshold, TTA and
post-processing from the config) and score them at the SCR masks' native
1024x1024 (0.35 mm) with ``evaluate_predictions``: Jaccard, Dice, HD95 and
ASSD per structure (lungs = left + right, clavicles = left + right), the
cardiothoracic ratio (CTR) against the one measured on the expert masks,
cardiomegaly agreement (CTR > 0.5) and the share of scans the QC flags.
Prints mean and worst case, the wall time of each stage, appends one row to
``--table`` (JSON lines; docs/accuracy.md is written from it) and logs the
result as an MLflow run (experiment ``jsrt-benchmark``) with the per-case
table as an artifact.

Protocol (docs/accuracy.md): splits are the workflow's (5-fold, seed 0);
fold 0 is the tuning fold on which levers are compared; the recipe is
reported on folds it was not tuned on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from snakemake.utils import update_config

ROOT = Path(__file__).resolve().parents[1]

# Jaccard (lungs, heart, clavicles) as published on JSRT/SCR (SCR's two folds).
PUBLISHED = {
    "human observer (van Ginneken et al. 2006)": (0.946, 0.878, 0.896),
    "Frid-Adar et al. 2018": (0.961, 0.906, 0.855),
    "Kholiavchenko et al. 2020": (0.971, 0.933, 0.903),
}
REPORTED = ("lungs", "heart", "clavicles")


def apply_override(config: dict, text: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into ``config``."""
    key, _, value = text.partition("=")
    if not _:
        raise SystemExit(f"--set needs key=value, got {text!r}")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def load_config(path: Path, overrides: list[str]) -> dict:
    """config/config.yaml, then ``path``, then the overrides (as Snakemake
    layers --configfile over the default)."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(path.read_text()) or {})
    for text in overrides:
        apply_override(config, text)
    return config


def parse_thresholds(text: str) -> dict[str, float]:
    """``heart=0.6,lungs=0.5`` -> {"heart": 0.6, "lungs": 0.5}."""
    try:
        values = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--model-thresholds {text!r}: expected LABEL=T,... with T between 0 and 1") from None
    if not all(0 < v < 1 for v in values.values()):
        raise SystemExit(f"--model-thresholds {text!r}: thresholds lie between 0 and 1")
    return values


def truth_ctr(masks_root: Path, case_id: str) -> float:
    """CTR of the expert (SCR) masks at their 1024x1024, 0.35 mm grid."""
    from medseg.inference.ctr import cardiothoracic_ratio
    from medseg.ingest.masks import read_scr_masks
    from medseg.structures import SCR_STRUCTURES

    masks, _ = read_scr_masks(masks_root, case_id, SCR_STRUCTURES, case_id)
    lungs = masks["left_lung"] | masks["right_lung"]
    return float(cardiothoracic_ratio(masks["heart"], lungs, (0.35, 0.35)).ctr)


def run_fold(config: dict, fold: int, pre, splits_path: Path, out: Path, target, data_root: Path,
             model_thresholds: dict[str, float] | None = None, sweep: list[float] | None = None,
             ensemble_with: list[Path] | None = None, tags: dict[str, str] | None = None) -> dict:
    """Train, predict and score one held-out fold; returns its tables and times."""
    import torch

    from medseg.inference.model import load_model
    from medseg.inference.predict import PredictSettings, predict_files
    from medseg.ingest import ReadOptions
    from medseg.ingest.inputs import InputFile
    from medseg.evaluation.evaluate import evaluate_predictions
    from medseg.preprocessing.splits import read_splits
    from medseg.training.run import train_fold
    from medseg.training.settings import TrainSettings

    settings = TrainSettings.from_dict(config["train"])
    labels = {k: tuple(v) for k, v in config["labels"].items()}
    fold_dir = out / f"fold{fold}"
    started = time.perf_counter()
    summary = train_fold(settings=settings, labels=labels, manifest=pre.manifest_path, splits=splits_path,
                         fold=fold, out_dir=fold_dir / "model", target=target,
                         params={"benchmark": "jsrt", "fold": str(fold)}, tags=tags,
                         intensity={"lower_percentile": config["preprocess"]["lower_percentile"],
                                    "upper_percentile": config["preprocess"]["upper_percentile"]})
    train_seconds = time.perf_counter() - started
    history = pd.read_csv(fold_dir / "model" / "metrics.csv")
    epoch_seconds = float(history["epoch_seconds"].sum())

    started = time.perf_counter()
    own = str(fold_dir / "model" / "best.pt")
    # With --ensemble-with: this fold's model averaged with the same fold's
    # models of other runs (trained on the same cases, never on these).
    model = load_model([own, *(str(w / f"fold{fold}" / "model" / "best.pt") for w in ensemble_with)]
                       if ensemble_with else own)
    if model_thresholds:
        model.thresholds = dict(model_thresholds)
    read = config["read"]
    predict = config["predict"]
    p_settings = PredictSettings(threshold=predict["threshold"], postprocess=predict["postprocess"],
                                 tta=predict["tta"], batch_size=predict["batch_size"], write_seg=False,
                                 read_options=ReadOptions(invert=read["invert"],
                                                          pixel_spacing_mm=read["pixel_spacing_mm"]))
    test_ids = read_splits(splits_path)["folds"][fold]["test"]
    manifest = pd.read_csv(pre.manifest_path).set_index("case_id")
    files = [InputFile(Path(manifest.loc[c, "source"]), Path(manifest.loc[c, "source"]).name, c) for c in test_ids]
    shutil.rmtree(fold_dir / "predictions", ignore_errors=True)  # always scored afresh (settings may differ)
    results, failures = predict_files(files, model, p_settings, fold_dir / "predictions", device=torch.device("cpu"))
    if failures:
        raise SystemExit(f"fold {fold}: prediction failed for {failures}")
    predict_seconds = time.perf_counter() - started
    table, problems = evaluate_predictions(fold_dir / "predictions", data_root / "masks", labels, "scr")
    if problems:
        raise SystemExit(f"fold {fold}: not scored: {problems}")
    swept: dict[str, dict[str, float]] = {}
    for threshold in sweep or []:  # one threshold for all labels; each label's best is read off per label
        folder = fold_dir / f"sweep-{threshold:g}"
        shutil.rmtree(folder, ignore_errors=True)
        predict_files(files, model, dataclasses.replace(p_settings, threshold=threshold), folder,
                      device=torch.device("cpu"))
        scored, _ = evaluate_predictions(folder, data_root / "masks", labels, "scr")
        swept[f"{threshold:g}"] = {label: float(rows["jaccard"].mean()) for label, rows in scored.groupby("label")}
        shutil.rmtree(folder, ignore_errors=True)
    table["fold"] = fold
    ctr = results[["case_id", "ctr", "qc_flags", "boundary_confidence"]].copy()
    ctr["ctr_truth"] = [truth_ctr(data_root / "masks", c) for c in ctr["case_id"]]
    ctr["fold"] = fold
    return {"table": table, "ctr": ctr, "train_seconds": train_seconds, "epoch_seconds": epoch_seconds,
            "predict_seconds": predict_seconds, "best_epoch": summary.get("best_epoch"), "sweep": swept,
            "n_test": len(test_ids)}


def summarise(table: pd.DataFrame, ctr: pd.DataFrame) -> dict[str, float]:
    """Flat figures: ``<metric>/<label>`` mean and ``worst_<metric>/<label>``,
    CTR error, cardiomegaly agreement, QC flag rates."""
    figures: dict[str, float] = {}
    for label, rows in table.groupby("label"):
        for metric in ("jaccard", "dice", "hd95_mm", "assd_mm"):
            values = rows[metric].astype(float)
            figures[f"{metric}/{label}"] = float(values.mean())
            worst = values.min() if metric in ("jaccard", "dice") else values.max()
            figures[f"worst_{metric}/{label}"] = float(worst)
    measured = ctr.dropna(subset=["ctr", "ctr_truth"])
    error = (measured["ctr"] - measured["ctr_truth"]).abs()
    figures["ctr_abs_error_mean"] = float(error.mean()) if len(error) else math.nan
    figures["ctr_abs_error_max"] = float(error.max()) if len(error) else math.nan
    figures["ctr_unmeasured"] = float(len(ctr) - len(measured))
    figures["cardiomegaly_agreement"] = float(((measured["ctr"] > 0.5) == (measured["ctr_truth"] > 0.5)).mean())
    figures["cardiomegaly_truth"] = float((ctr["ctr_truth"] > 0.5).sum())
    figures["cardiomegaly_predicted"] = float((measured["ctr"] > 0.5).sum())
    flags = ctr["qc_flags"].fillna("").astype(str)
    figures["qc_flagged_rate"] = float((flags != "").mean())
    figures["qc_low_confidence_rate"] = float(flags.str.contains("low_confidence").mean())
    confidence = ctr["boundary_confidence"].astype(float)
    figures["boundary_confidence_min"] = float(confidence.min())
    figures["boundary_confidence_p05"] = float(confidence.quantile(0.05))
    figures["boundary_confidence_median"] = float(confidence.median())
    return figures


def print_report(name: str, figures: dict, n_cases: int, folds: list[int], times: dict) -> None:
    print(f"\n== {name}: {n_cases} held-out JSRT cases (folds {', '.join(map(str, folds))}), scored at 1024x1024")
    print(f"{'structure':<10} {'Jaccard':>8} {'worst':>6} {'Dice':>7} {'worst':>6} "
          f"{'HD95 mm':>8} {'worst':>6} {'ASSD mm':>8} {'worst':>6}")
    for label in REPORTED:
        if f"jaccard/{label}" not in figures:
            continue
        f = {k.split("/")[0]: v for k, v in figures.items() if k.endswith(f"/{label}")}
        print(f"{label:<10} {f['jaccard']:>8.3f} {f['worst_jaccard']:>6.3f} {f['dice']:>7.3f} {f['worst_dice']:>6.3f} "
              f"{f['hd95_mm']:>8.2f} {f['worst_hd95_mm']:>6.1f} {f['assd_mm']:>8.2f} {f['worst_assd_mm']:>6.1f}")
    print(f"CTR |error| mean {figures['ctr_abs_error_mean']:.4f}, max {figures['ctr_abs_error_max']:.3f} "
          f"({figures['ctr_unmeasured']:.0f} scans without a CTR); cardiomegaly (CTR > 0.5) agreement "
          f"{100 * figures['cardiomegaly_agreement']:.1f} % ({figures['cardiomegaly_predicted']:.0f} called, "
          f"{figures['cardiomegaly_truth']:.0f} by the expert masks)")
    print(f"QC: {100 * figures['qc_flagged_rate']:.1f} % of scans flagged, "
          f"{100 * figures['qc_low_confidence_rate']:.1f} % low_confidence; boundary confidence min "
          f"{figures['boundary_confidence_min']:.3f}, 5th percentile {figures['boundary_confidence_p05']:.3f}, "
          f"median {figures['boundary_confidence_median']:.3f}")
    print("wall time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in times.items()))
    print("published Jaccard (lungs / heart / clavicles):")
    for who, (lungs, heart, clavicles) in PUBLISHED.items():
        print(f"  {who:<42} {lungs:.3f} / {heart:.3f} / {clavicles:.3f}")
    ours = [figures.get(f"jaccard/{k}", math.nan) for k in REPORTED]
    print(f"  {'medseg: ' + name:<42} {ours[0]:.3f} / {ours[1]:.3f} / {ours[2]:.3f}")


TERMS = ("Trained on the JSRT database (Japanese Society of Radiological Technology) with the SCR masks "
         "(van Ginneken et al., Medical Image Analysis 2006): for research and education only, not for clinical "
         "use; publications using it cite Shiraishi et al., AJR 2000 and van Ginneken et al. 2006.")


def ship(config: dict, args, pre, out: Path, target) -> None:
    """Train the recipe on every case (no held-out, no validation: the last
    epoch is kept) and write ``medseg/models/<name>.pt`` (weights in float16
    plus the contract) and its card with the cross-validation figures of the
    ``--cv-from`` row of ``--table``."""
    import hashlib

    import torch

    from medseg.models import _folder
    from medseg.tracking import client_for
    from medseg.preprocessing.splits import write_splits
    from medseg.training.run import train_fold
    from medseg.training.settings import TrainSettings

    ids = [r["case_id"] for r in pre.rows]
    write_splits(out / "all-cases.json", {"scheme": "all", "seed": 0, "val_fraction": 0.0,
                                          "folds": [{"train": ids, "val": [], "test": []}]})
    settings = TrainSettings.from_dict(config["train"])
    train_fold(settings=settings, labels={k: tuple(v) for k, v in config["labels"].items()},
               manifest=pre.manifest_path, splits=out / "all-cases.json", fold=0, out_dir=out / "all-cases",
               target=target, params={"benchmark": "jsrt-ship"},
               intensity={"lower_percentile": config["preprocess"]["lower_percentile"],
                          "upper_percentile": config["preprocess"]["upper_percentile"]})
    history = pd.read_csv(out / "all-cases" / "metrics.csv")
    seconds = float(history["epoch_seconds"].sum())  # the training itself, also when this reran a finished one
    # Read after training, so the two can run side by side; rerunning --ship
    # once the row exists does not train again.
    rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()] \
        if args.table.is_file() else []
    cv_rows = [r for r in rows if r["name"] == args.cv_from]
    if not cv_rows:
        raise SystemExit(f"trained; --cv-from {args.cv_from}: no such row in {args.table} yet: rerun when it exists")
    cv = cv_rows[-1]
    from medseg.training.settings import TrainSettings

    if (TrainSettings.from_dict(cv["train"]).fingerprint() != TrainSettings.from_dict(config["train"]).fingerprint()
            or cv["preprocess"] != config["preprocess"]):
        raise SystemExit(f"--cv-from {args.cv_from} was measured with other train/preprocess settings")
    # The card describes one network predicting as the shipped one will.
    if cv.get("ensemble_with"):
        raise SystemExit(f"--cv-from {args.cv_from} is an ensemble's row; the shipped model is one network")
    if cv["predict"] != config["predict"]:
        raise SystemExit(f"--cv-from {args.cv_from} was predicted with other settings: {cv['predict']}")
    if args.model_thresholds and cv.get("model_thresholds") != parse_thresholds(args.model_thresholds):
        raise SystemExit(f"--cv-from {args.cv_from} was scored with thresholds {cv.get('model_thresholds')}, "
                         f"not {args.model_thresholds}")
    state = torch.load(out / "all-cases" / "best.pt", map_location="cpu", weights_only=False)
    # Where it trained, as the training run recorded it (e.g. "cpu:1threads").
    run_id = json.loads((out / "all-cases" / "model.json").read_text())["run_id"]
    device = client_for(target.tracking_uri).get_run(run_id).data.tags.get("device", "unknown")
    device = device.replace("cpu:1threads", "one CPU core").replace("threads", " CPU threads").replace("cpu:", "")
    slim = {key: state[key] for key in ("settings", "labels", "size", "intensity", "dataset_fingerprint")}
    # float16 halves the file; prediction runs in float32 (the loader casts).
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    slim["epoch"] = state["epoch"]
    if args.min_confidence is not None:
        slim["qc"] = {"min_confidence": args.min_confidence}
    if args.model_thresholds:
        slim["thresholds"] = parse_thresholds(args.model_thresholds)
    folder = _folder()
    checkpoint = folder / f"{args.ship}.pt"
    torch.save(slim, checkpoint)
    figures = cv["figures"]
    card = {
        "name": args.ship,
        "file": checkpoint.name,
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "description": "Heart, lungs and clavicles on frontal (PA) chest radiographs; multi-label, one sigmoid "
                       "channel per structure.",
        "labels": state["labels"],
        "size": state["size"],
        "training": {"data": f"all {len(ids)} radiographs of {args.data_root.name} (JSRT/SCR, SCR fold 1)",
                     "recipe": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
                     else str(args.config),
                     "epochs": settings.epochs, "seconds": round(seconds), "device": device,
                     "dataset_fingerprint": state["dataset_fingerprint"]},
        "cross_validation": {
            "protocol": f"models of the same recipe trained on the other folds of a 5-fold split of SCR fold 1 "
                        f"(~84 cases each; this model trained on all {len(ids)}), scored on held-out "
                        f"fold{'s' if len(cv['folds']) > 1 else ''} {', '.join(map(str, cv['folds']))}"
                        + (", the tuning fold: these cases also chose the recipe" if 0 in cv["folds"] else ""),
            "n_cases": cv["n_cases"],
            "structures": {label: {m: figures[f"{m}/{label}"] for m in ("jaccard", "dice", "hd95_mm", "assd_mm")}
                           for label in REPORTED if f"jaccard/{label}" in figures},
            "ctr_abs_error_mean": figures["ctr_abs_error_mean"],
            "cardiomegaly_agreement": figures["cardiomegaly_agreement"],
        },
        "qc": slim.get("qc", {}),
        "thresholds": slim.get("thresholds", {}),
        "terms": TERMS,
    }
    (folder / f"{args.ship}.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"shipped {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB) and its card; "
          f"trained {seconds / 60:.1f} min on {len(ids)} cases")


def augment_text(augment: dict) -> str:
    """", augmentation k=v ..." for the settings a row changed from the defaults ("" if none)."""
    from medseg.training.data import AugmentSettings

    default = dataclasses.asdict(AugmentSettings())
    changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
               for k, v in augment.items() if k in default and v != default[k]]
    return f", augmentation {' '.join(changed)}" if changed else ""


def markdown_table(rows: list[dict]) -> str:
    """The experiments table of docs/accuracy.md: one line per row of
    ``--table`` (config and overrides, held-out folds, Jaccard per structure,
    clavicle HD95, CTR error, cardiomegaly agreement, training minutes)."""
    lines = ["| experiment | recipe | held-out folds (cases) | Jaccard lungs | heart | clavicles "
             "| HD95 mm lungs / heart / clavicles | CTR abs. error | cardiomegaly agreement | train min / fold |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f = row["figures"]
        t = row["train"]
        recipe = (f"{t['network']} {t['preset']}, {row['preprocess']['size']} px, {t['optimizer']} "
                  f"{t['learning_rate']:g} {t['scheduler']}, {t['epochs']} epochs"
                  + (f" x {t['samples_per_epoch']}" if t.get("samples_per_epoch") else "")
                  + (f", EMA {t['ema_decay']:g}" if t.get("ema_decay") else "")
                  + (f", patches {t['patch_size']} px" if t.get("patch_size") else "")
                  + (", soft labels" if t.get("soft_labels") else "")
                  + (f", clavicles x {w:g}" if (w := (t.get("label_weights") or {}).get("clavicles", 2.0)) != 2.0 else "")
                  + (f", seed {t['seed']}" if t.get("seed") else "")
                  + augment_text(t.get("augment") or {})
                  + (f", thresholds {row['model_thresholds']}" if row.get("model_thresholds") else "")
                  + (f", averaged with {', '.join(row['ensemble_with'])}" if row.get("ensemble_with") else "")
                  + (", TTA" if row["predict"].get("tta") else ""))
        hd95 = " / ".join(f"{f.get(f'hd95_mm/{k}', math.nan):.1f}" for k in REPORTED)
        lines.append(
            f"| {row['name']} | {recipe} | "
            f"{' '.join(map(str, row['folds']))} ({row['n_cases']}) | {f['jaccard/lungs']:.3f} | {f['jaccard/heart']:.3f} "
            f"| {f['jaccard/clavicles']:.3f} | {hd95} | {f['ctr_abs_error_mean']:.4f} | "
            f"{100 * f['cardiomegaly_agreement']:.0f} % | {row['seconds']['train_per_fold'] / 60:.1f} |")
    return "\n".join(lines)


def _table_suffix(name: str, row_name: str) -> str:
    """How the per-case tables of row ``row_name`` of run ``name`` are named
    (``cases<suffix>.csv``, ``ctr<suffix>.csv``)."""
    return row_name[len(name):] if row_name.startswith(name) else f"-{row_name}"


def pool_rows(args) -> None:
    """One row from the per-case tables of earlier rows of one run (folds
    scored one at a time): the same figures as scoring those folds together,
    since every figure is computed from the pooled cases."""
    if not args.name or not args.label:
        raise SystemExit("--pool needs --name (the run) and --label (the pooled row's name)")
    rows = {}
    for line in args.table.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["name"]] = row  # the latest row of a name
    missing = [r for r in args.pool if r not in rows]
    if missing:
        raise SystemExit(f"{args.table}: no row named {', '.join(missing)}")
    picked = [rows[r] for r in args.pool]
    from medseg.training.settings import TrainSettings

    # Settings added later hash only when set (TrainSettings.fingerprint): rows
    # written before a setting existed are the same recipe as rows with its default.
    if len({TrainSettings.from_dict(r["train"]).fingerprint() for r in picked}) > 1:
        raise SystemExit("--pool rows differ in their train settings: they are not one recipe")
    for what in ("preprocess", "predict", "model_thresholds", "ensemble_with"):
        if any(json.dumps(r.get(what), sort_keys=True) != json.dumps(picked[0].get(what), sort_keys=True)
               for r in picked):
            raise SystemExit(f"--pool rows differ in {what}: they are not one recipe")
    folds = [k for r in picked for k in r["folds"]]
    if len(set(folds)) != len(folds):
        raise SystemExit(f"--pool rows share held-out folds ({folds}): a case would count twice")
    out = args.work / args.name
    tables = [pd.read_csv(out / f"cases{_table_suffix(args.name, r['name'])}.csv") for r in picked]
    ctrs = [pd.read_csv(out / f"ctr{_table_suffix(args.name, r['name'])}.csv") for r in picked]
    table, ctr = pd.concat(tables, ignore_index=True), pd.concat(ctrs, ignore_index=True)
    suffix = _table_suffix(args.name, args.label)
    table.to_csv(out / f"cases{suffix}.csv", index=False)
    ctr.to_csv(out / f"ctr{suffix}.csv", index=False)
    figures = summarise(table, ctr)
    n = [r["n_cases"] for r in picked]
    times = {k: float(np.average([r["seconds"][k] for r in picked], weights=n))
             for k in ("preprocess", "train_per_fold", "predict_and_score_per_fold")}
    times["train_all_folds"] = float(sum(r["seconds"]["train_all_folds"] for r in picked))
    print_report(args.label, figures, len(ctr), folds, times)
    row = {**picked[0], "name": args.label, "folds": folds, "n_cases": int(len(ctr)), "figures": figures,
           "seconds": times, "best_epochs": [e for r in picked for e in r["best_epochs"]], "threshold_sweep": {},
           "pooled_from": list(args.pool), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with args.table.open("a") as handle:
        handle.write(json.dumps(row, default=float) + "\n")
    print(f"pooled {len(picked)} rows ({len(ctr)} cases); row appended to {args.table}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "jsrt-cpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.epochs=10 (repeatable)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0], help="held-out folds to run")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "jsrt-scr-fold1")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "jsrt-benchmark",
                        help="preprocessing cache, runs and the MLflow store")
    parser.add_argument("--name", help="experiment name (default: the config's stem)")
    parser.add_argument("--table", type=Path, default=ROOT / "results" / "jsrt-benchmark" / "runs.jsonl",
                        help="JSON lines file the result row is appended to")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite in --work)")
    parser.add_argument("--ship", metavar="NAME",
                        help="instead of cross-validating: train on every case and write medseg/models/NAME.pt "
                             "and its card")
    parser.add_argument("--cv-from", metavar="ROW", help="with --ship: the --table row whose figures the card gives")
    parser.add_argument("--min-confidence", type=float,
                        help="with --ship: the QC threshold calibrated on cross-validation (docs/accuracy.md)")
    parser.add_argument("--model-thresholds", metavar="LABEL=T,...",
                        help="per-label probability thresholds given to the models (as a shipped model records "
                             "the ones chosen on cross-validation)")
    parser.add_argument("--sweep-thresholds", type=float, nargs="+", metavar="T",
                        help="also score the held-out cases at these thresholds (all labels) and print each "
                             "label's best")
    parser.add_argument("--label", help="the row's name (default --name, plus +NAME per --ensemble-with): "
                                        "e.g. to score a trained run again with other prediction settings")
    parser.add_argument("--ensemble-with", nargs="+", default=[], metavar="NAME",
                        help="predict with this run's fold model averaged with the same folds' models of these "
                             "earlier runs (under --work)")
    parser.add_argument("--pool", nargs="+", metavar="ROW",
                        help="write one row (named --label) that pools the per-case tables of these earlier rows "
                             "of the same --name (e.g. held-out folds scored one at a time) and exit")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="MLflow tag on the training and benchmark runs (repeatable; e.g. a comparison's "
                             "name, by which the MLflow UI groups runs)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the experiments table of --table as Markdown (docs/accuracy.md) and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    if args.pool:
        pool_rows(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import mlflow

    from medseg.ingest import ReadOptions
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
    from medseg.preprocessing.splits import make_splits, write_splits
    from medseg.training.run import TrackingTarget

    if not (args.data_root / "images").is_dir():
        raise SystemExit(f"{args.data_root}: no images/ folder (JSRT/SCR data root expected)")
    config = load_config(args.config, args.set)
    name = args.name or args.config.stem
    out = args.work / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    begin = time.perf_counter()

    pre_cfg = config["preprocess"]
    pre_dir = args.work / f"pre-{pre_cfg['size']}-{pre_cfg['lower_percentile']}-{pre_cfg['upper_percentile']}"
    read = config["read"]
    spec = DatasetSpec(images=args.data_root / "images", masks_root=args.data_root / "masks",
                       read_options=ReadOptions(invert=read["invert"], pixel_spacing_mm=read["pixel_spacing_mm"]))
    pre = preprocess_dataset(spec, PreprocessSettings(pre_cfg["size"], pre_cfg["lower_percentile"],
                                                      pre_cfg["upper_percentile"]), pre_dir, workers=2)
    if pre.failures:
        raise SystemExit(f"preprocessing failed: {pre.failures[:3]}")
    preprocess_seconds = time.perf_counter() - begin
    split_cfg = config["splits"]
    splits = make_splits([r["case_id"] for r in pre.rows], split_cfg["scheme"], k=split_cfg["k"],
                         seed=split_cfg["seed"], val_fraction=split_cfg["val_fraction"])
    write_splits(out / "splits.json", splits)

    tracking = args.tracking_uri or f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    target = TrackingTarget(tracking, f"jsrt-benchmark-{name}", f"medseg-jsrt-benchmark-{name}",
                            system_metrics=False)
    if args.ship:
        if not args.cv_from:
            raise SystemExit("--ship needs --cv-from (the cross-validation row the card reports)")
        ship(config, args, pre, out, target)
        return
    thresholds = parse_thresholds(args.model_thresholds) if args.model_thresholds else {}
    tags = dict(t.split("=", 1) for t in args.tag)
    folds = [run_fold(config, k, pre, out / "splits.json", out, target, args.data_root, thresholds,
                      args.sweep_thresholds, [args.work / n for n in args.ensemble_with], tags)
             for k in args.folds]
    sweep: dict[str, dict[str, float]] = {}
    if args.sweep_thresholds:  # case-weighted mean over the folds
        n = [f["n_test"] for f in folds]
        for t in folds[0]["sweep"]:
            sweep[t] = {label: float(np.average([f["sweep"][t][label] for f in folds], weights=n))
                        for label in folds[0]["sweep"][t]}
        print("\nthreshold sweep (mean Jaccard of the held-out cases):")
        for t, values in sweep.items():
            print(f"  {t:>5}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        best = {label: max(sweep, key=lambda t: sweep[t][label]) for label in next(iter(sweep.values()))}
        print("  best per label: " + ",".join(f"{k}={v}" for k, v in best.items()))
    table = pd.concat([f["table"] for f in folds], ignore_index=True)
    ctr = pd.concat([f["ctr"] for f in folds], ignore_index=True)
    # An ensemble reuses this run's trained folds: its row and tables get their own name.
    suffix = "".join(f"+{n}" for n in args.ensemble_with)
    row_name = args.label or name + suffix
    suffix = _table_suffix(name, row_name)
    table.to_csv(out / f"cases{suffix}.csv", index=False)
    ctr.to_csv(out / f"ctr{suffix}.csv", index=False)
    figures = summarise(table, ctr)
    # A fold trained by an earlier invocation: its epochs' own seconds.
    train = [max(f["train_seconds"], f["epoch_seconds"]) for f in folds]
    times = {"preprocess": preprocess_seconds,
             "train_all_folds": float(sum(train)),
             "train_per_fold": float(np.mean(train)),
             "predict_and_score_per_fold": float(np.mean([f["predict_seconds"] for f in folds])),
             "total": time.perf_counter() - begin}
    print_report(row_name, figures, len(ctr), args.folds, times)

    row: dict[str, Any] = {"name": row_name, "config": str(args.config), "overrides": args.set, "folds": args.folds,
                           "n_cases": int(len(ctr)), "train": config["train"], "preprocess": pre_cfg,
                           "predict": config["predict"], "figures": figures, "seconds": times,
                           "best_epochs": [f["best_epoch"] for f in folds],
                           "model_thresholds": thresholds, "threshold_sweep": sweep,
                           "ensemble_with": args.ensemble_with,
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.table.parent.mkdir(parents=True, exist_ok=True)
    with args.table.open("a") as handle:
        handle.write(json.dumps(row, default=float) + "\n")

    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("jsrt-benchmark")
    with mlflow.start_run(run_name=row_name, tags={"benchmark": "jsrt", "folds": " ".join(map(str, args.folds)),
                                                   "medseg.network": config["train"]["network"],
                                                   "medseg.upsample": config["train"]["upsample"], **tags}):
        from medseg.tracking import flatten

        mlflow.log_params({k: v for k, v in flatten(config["train"], "train").items()})
        mlflow.log_params({"preprocess.size": pre_cfg["size"], "predict.tta": config["predict"]["tta"],
                           "folds": " ".join(map(str, args.folds)), "n_cases": len(ctr)})
        mlflow.log_metrics({k: v for k, v in figures.items() if math.isfinite(v)})
        mlflow.log_metrics({f"seconds/{k}": v for k, v in times.items()})
        mlflow.log_artifact(str(out / f"cases{suffix}.csv"))
        mlflow.log_artifact(str(out / f"ctr{suffix}.csv"))
        mlflow.log_artifact(str(out / "config.yaml"))
    print(f"outputs in {out}; row appended to {args.table}")


if __name__ == "__main__":
    sys.exit(main())
