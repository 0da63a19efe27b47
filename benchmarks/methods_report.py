"""``benchmarks/methods.py report``: the methods table and figures in docs/methods.md.

Reads the rows ``methods.py train`` appended (the newest row per method),
loads each method's trained fold-0 model, and measures on this CPU, one core
(``torch.set_num_threads(1)``), with nothing else running:

- parameters; training images/s (AdamW steps on batches of 8 at the
  training size, forward + backward); prediction scans/s (the product's
  ``predict_files`` on held-out radiographs: read the 1024x1024 PNG,
  preprocess, predict, post-process, write the masks);
- the checkerboard score (:func:`medseg.evaluation.checkerboard.checkerboard_score`)
  of the output probabilities and of the gradient of their sum with respect
  to the input, at initialisation (the method's network built with the
  training seed) and after training, over the held-out preprocessed
  radiographs of fold 0 (one score over all scans and channels);
- two figures on one held-out radiograph: each method's outputs at
  initialisation and after training, and its input gradients.

Writes the block between the markers in docs/methods.md, the figures in
docs/figures/, and logs the figures and scores as an MLflow run (experiment
``jsrt-benchmark``, tag ``medseg.comparison=methods``).
"""

from __future__ import annotations

import json
import logging
import textwrap
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from methods import COMPARISON, DOC, FIGURES, METHODS, ROOT, WORK, method_name

BEGIN, END = "<!-- methods:begin (benchmarks/methods.py report writes this block) -->", "<!-- methods:end -->"
STRUCTURES = ("lungs", "heart", "clavicles")
N_PREDICT = 8  # scans timed per method


def _rows(table: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for line in table.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["name"]] = row  # the newest wins
    return rows


def _train_rate(net: torch.nn.Module, size: int, channels: int, seconds: float = 6.0) -> float:
    net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(8, 1, size, size)
    y = (torch.rand(8, channels, size, size) > 0.5).float()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 2:
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
        optimiser.step()
        steps += 1
    return 8 * steps / (time.perf_counter() - started)


def _forward_seconds(net: torch.nn.Module, network: str, side: int = 1539) -> float:
    """One forward pass on a side x side image (the lecture's DeepLab demo
    size), padded up to what the network needs (MONAI UNet: 1552)."""
    from medseg.training.choices import INPUT_MULTIPLE

    multiple = INPUT_MULTIPLE.get(network, 1)
    side = -(-side // multiple) * multiple
    net.eval()
    x = torch.rand(1, 1, side, side)
    with torch.no_grad():
        started = time.perf_counter()
        net(x)
    return time.perf_counter() - started


def _scores(net: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    from medseg.evaluation.checkerboard import checkerboard_score, input_gradient

    net.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(net(images)).numpy()
    gradients = np.concatenate([input_gradient(net, images[i:i + 1]) for i in range(len(images))])
    return {"output": checkerboard_score(probabilities), "gradient": checkerboard_score(gradients),
            "probabilities": probabilities[0], "gradient_map": gradients[0, 0]}


def _stretch(a: np.ndarray, low: float = 1, high: float = 99) -> np.ndarray:
    lo, hi = np.percentile(a, [low, high])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def _composite(probabilities: np.ndarray, stretch: bool) -> np.ndarray:
    """(3, H, W) heart, lungs, clavicles -> RGB (H, W, 3): red, green, blue."""
    channels = [_stretch(p) if stretch else p for p in probabilities[:3]]
    return np.clip(np.stack(channels, axis=-1), 0, 1)


def _grid(rows: list[tuple[str, list[tuple[np.ndarray, str, str | None]]]], title: str, path: Path) -> Path:
    """One row per method: (label, [(image, panel title, colormap or None for RGB)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.75 * columns + 0.6, 2.0 * len(rows) + 0.8),
                             constrained_layout=True, squeeze=False)
    for axes_row, (label, panels) in zip(axes, rows):
        for ax, (image, panel_title, cmap) in zip(axes_row, panels):
            if cmap == "RdBu_r":
                limit = float(np.percentile(np.abs(image), 99)) or 1.0
                ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
            else:
                ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_title(panel_title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes_row[0].set_ylabel(label, fontsize=8)
    fig.suptitle(textwrap.fill(title.replace("\n", " "), width=int(26 * columns + 10)), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CROP = (slice(96, 144), slice(40, 88))  # 48 x 48 px at 256 px: right lung field and its lateral border


def _figures(results: list[dict], docs: Path, local: Path) -> dict[str, Path]:
    """Zoomed crops (docs/figures, committed: no whole radiograph, which JSRT's
    terms keep out of the repository) and whole-image versions (``local``,
    under results/, not committed)."""
    outputs_title = ("Output probabilities on one held-out JSRT radiograph (256 px). At initialisation: the lungs "
                     "channel, contrast-stretched (1st-99th percentile); trained: red heart, green lungs, blue "
                     "clavicles. Scores: checkerboard peak ratio over all scans and channels (1 = none).")
    outputs_crop_title = ("Output probabilities (lungs channel) on one held-out JSRT radiograph at 256 px: "
                          "48 x 48 px crops of the right lung field and its lateral border, contrast-stretched "
                          "within the crop (initialisation 1st-99th percentile, trained 10th-90th, so that ripples "
                          "on the near-1 interior show). Scores: checkerboard peak ratio over all held-out scans "
                          "and channels (1 = none).")
    gradients_title = ("Gradient of the summed output probabilities with respect to the input, same radiograph "
                       "(red positive, blue negative,\nsymmetric scale at the 99th percentile of |gradient|); "
                       "scores: checkerboard peak ratio (1 = none).")
    zoom = "48 x 48 px"
    paths = {}
    for whole, folder, suffix in ((False, docs, ""), (True, local, "-whole")):
        output_rows, gradient_rows = [], []
        for r in results:
            label = f"{r['network']}\n{r['upsample']}"
            lungs = _stretch(r["init"]["probabilities"][1])
            trained = _composite(r["trained"]["probabilities"], False)
            g0, g1 = r["init"]["gradient_map"], r["trained"]["gradient_map"]
            o_init, o_trained = f"init, score {r['init']['output']:.1f}", f"trained, score {r['trained']['output']:.1f}"
            d_init, d_trained = (f"init, score {r['init']['gradient']:.1f}",
                                 f"trained, score {r['trained']['gradient']:.1f}")
            if whole:
                output_rows.append((label, [(lungs, o_init, "gray"), (lungs[CROP], f"init, {zoom}", "gray"),
                                            (trained, o_trained, None), (trained[CROP], f"trained, {zoom}", None)]))
                gradient_rows.append((label, [(g0, d_init, "RdBu_r"), (g0[CROP], f"init, {zoom}", "RdBu_r"),
                                              (g1, d_trained, "RdBu_r"), (g1[CROP], f"trained, {zoom}", "RdBu_r")]))
            else:  # side by side: one column per method, initialisation above, trained below
                name = f"{r['network']}\n{r['upsample']}"
                trained_lungs = _stretch(r["trained"]["probabilities"][1][CROP], 10, 90)
                output_rows.append((lungs[CROP], f"{name}\n{o_init}", trained_lungs, o_trained))
                gradient_rows.append((g0[CROP], f"{name}\n{d_init}", g1[CROP], d_trained))
        if not whole:
            output_rows = [("initialisation", [(a, t, "gray") for a, t, _, _ in output_rows]),
                           ("trained", [(b, u, "gray") for _, _, b, u in output_rows])]
            gradient_rows = [("initialisation", [(a, t, "RdBu_r") for a, t, _, _ in gradient_rows]),
                             ("trained", [(b, u, "RdBu_r") for _, _, b, u in gradient_rows])]
        paths[f"outputs{suffix}"] = _grid(output_rows, outputs_title if whole else outputs_crop_title,
                                          folder / f"methods-outputs{suffix}.png")
        gradient_note = "" if whole else " Crops: 48 x 48 px of the right lung field and its lateral border."
        paths[f"gradients{suffix}"] = _grid(gradient_rows, gradients_title + gradient_note,
                                            folder / f"methods-gradients{suffix}.png")
    return paths


def _table(results: list[dict]) -> str:
    head = ("| network | upsample | parameters | train img/s | predict scans/s | Jaccard lungs | heart | clavicles "
            "| Dice lungs | heart | clavicles | HD95 mm lungs / heart / clavicles | s per 1539 px image "
            "| checkerboard output init → trained | gradient init → trained |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        f = r["figures"]
        jac = " | ".join(f"{f[f'jaccard/{s}']:.3f}" for s in STRUCTURES)
        dice = " | ".join(f"{f[f'dice/{s}']:.3f}" for s in STRUCTURES)
        hd = " / ".join(f"{f[f'hd95_mm/{s}']:.1f}" for s in STRUCTURES)
        lines.append(f"| {r['network']} | {r['upsample']} | {r['parameters']:,} | {r['train_rate']:.1f} "
                     f"| {r['predict_rate']:.2f} | {jac} | {dice} | {hd} | {r['forward_1539']:.1f} "
                     f"| {r['init']['output']:.1f} → {r['trained']['output']:.1f} "
                     f"| {r['init']['gradient']:.1f} → {r['trained']['gradient']:.1f} |")
    return "\n".join(lines)


def report(table: Path, only: list[str] | None = None, reuse: bool = False) -> None:
    import mlflow

    from medseg.inference.model import load_model
    from medseg.inference.predict import PredictSettings, predict_files
    from medseg.ingest import ReadOptions
    from medseg.ingest.inputs import InputFile
    from medseg.preprocessing.splits import read_splits
    from medseg.training.data import load_cases
    from medseg.training.network import NetworkSpec, build_network, count_parameters

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows = _rows(table)
    results = []
    cache = WORK / "methods-report.pt"  # the measurements, for --reuse (figures and text only)
    for network, upsample in ([] if reuse else METHODS):
        name = method_name(network, upsample)
        if only and name not in only and network not in only:
            continue
        if name not in rows:
            print(f"{name}: no row in {table}; skipped (run `methods.py train --only {name}`)")
            continue
        row = rows[name]
        config = row["train"]
        run_config = yaml.safe_load((WORK / name / "config.yaml").read_text())  # what jsrt.py ran with
        labels = run_config["labels"]
        pre = row["preprocess"]
        manifest = WORK / f"pre-{pre['size']}-{pre['lower_percentile']}-{pre['upper_percentile']}" / "manifest.csv"
        test_ids = read_splits(WORK / name / "splits.json")["folds"][0]["test"]
        images = torch.as_tensor(load_cases(manifest, test_ids, labels).images, dtype=torch.float32)
        started = time.perf_counter()
        torch.manual_seed(config["seed"])
        fresh = build_network(NetworkSpec(network, config["preset"], upsample, out_channels=len(labels)))
        model = load_model(str(WORK / name / "fold0" / "model" / "best.pt"))
        trained = model.module.net
        result = {"network": network, "upsample": upsample, "figures": row["figures"],
                  "parameters": count_parameters(trained),
                  "init": _scores(fresh, images), "trained": _scores(trained, images),
                  "forward_1539": _forward_seconds(trained, network),
                  "train_rate": _train_rate(build_network(NetworkSpec(network, config["preset"], upsample,
                                                                      out_channels=len(labels))),
                                            pre["size"], len(labels))}
        manifest_rows = pd.read_csv(manifest).set_index("case_id")
        files = [InputFile(Path(manifest_rows.loc[c, "source"]), Path(manifest_rows.loc[c, "source"]).name, c)
                 for c in test_ids[:N_PREDICT]]
        read = run_config["read"]
        settings = PredictSettings(write_seg=False, read_options=ReadOptions(invert=read["invert"],
                                                                             pixel_spacing_mm=read["pixel_spacing_mm"]))
        with tempfile.TemporaryDirectory() as folder:
            begin = time.perf_counter()
            _, failures = predict_files(files, model, settings, Path(folder), device=torch.device("cpu"))
            result["predict_rate"] = len(files) / (time.perf_counter() - begin)
        if failures:
            raise SystemExit(f"{name}: prediction failed: {failures}")
        results.append(result)
        print(f"{name}: output {result['init']['output']:.2f} -> {result['trained']['output']:.2f}, gradient "
              f"{result['init']['gradient']:.2f} -> {result['trained']['gradient']:.2f}, "
              f"{result['train_rate']:.1f} img/s, {result['predict_rate']:.2f} scans/s "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    if reuse:
        results = torch.load(cache, weights_only=False)
    else:
        torch.save(results, cache)
    figures = _figures(results, FIGURES, WORK / "methods-figures")
    outputs, gradients = figures["outputs"], figures["gradients"]
    first = rows[method_name(*METHODS[0])]
    n_cases = first["n_cases"]
    block = "\n".join([
        BEGIN,
        "",
        f"Held-out fold 0 ({n_cases} radiographs), each method trained with the same budget: "
        f"{first['train']['epochs']} epochs over the same ~84 training cases at {first['preprocess']['size']} px, "
        f"preset `{first['train']['preset']}`, the CPU recipe's optimiser otherwise (`config/jsrt-cpu.yaml`: "
        f"AdamW {first['train']['learning_rate']}, cosine, EMA {first['train']['ema_decay']}). Jaccard, Dice and "
        "HD95 scored at the masks' 1024x1024 (0.35 mm). Speeds on one core of this CPU (2-core machine, "
        "nothing else running): training images/s (batches of 8, forward, backward, AdamW step), prediction "
        "scans/s end to end (`predict_files`: read the 1024 px PNG, preprocess, predict, post-process, write), "
        "and one forward pass at 1539x1539 px (the lecture's DeepLab road-scene demo size). Checkerboard: peak ratio at the period-2 frequencies (1 = none, "
        "hard-edged masks up to ~2.4; `medseg.evaluation.checkerboard`) over the held-out scans and channels.",
        "",
        _table(results),
        "",
        f"![outputs]({outputs.relative_to(DOC.parent).as_posix()})",
        "",
        "*Figure 1. Each method's output probabilities (lungs channel) on the same held-out radiograph at "
        "initialisation (top) and after training (bottom), as 48 x 48 px crops of the right lung field and its "
        "lateral border, contrast-stretched within each crop so that a period-2 pattern shows. The whole-image "
        "versions "
        "are written to `results/jsrt-benchmark/methods-figures/` (not committed: JSRT's terms keep its "
        "radiographs, and pictures that show them, out of the repository).*",
        "",
        f"![gradients]({gradients.relative_to(DOC.parent).as_posix()})",
        "",
        "*Figure 2. The gradient of the summed output probabilities with respect to the input image, "
        "at initialisation (top) and after training (bottom), same crops (red positive, blue negative).*",
        "",
        f"Regenerate: `.venv/bin/python benchmarks/methods.py train --jobs 2` "
        f"(rows in `{table.relative_to(ROOT).as_posix()}`), then `.venv/bin/python benchmarks/methods.py report`.",
        "",
        END,
    ])
    text = DOC.read_text() if DOC.exists() else f"# Methods\n\n{BEGIN}\n{END}\n"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    DOC.write_text(before + block + after)
    print(f"wrote {DOC}, {outputs}, {gradients}")

    if reuse:  # the measurements' MLflow run was logged when they were made
        return
    mlflow.set_tracking_uri(f"sqlite:///{(WORK / 'mlflow.db').resolve()}")
    mlflow.set_experiment("jsrt-benchmark")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("jsrt-benchmark")
    for run in client.search_runs([experiment.experiment_id], f"tags.`medseg.comparison` = '{COMPARISON}'"):
        # Rows logged before jsrt.py tagged them: network and upsample from the params.
        for key in ("network", "upsample"):
            if f"medseg.{key}" not in run.data.tags and f"train.{key}" in run.data.params:
                client.set_tag(run.info.run_id, f"medseg.{key}", run.data.params[f"train.{key}"])
    with mlflow.start_run(run_name="methods-report", tags={"benchmark": "jsrt", "medseg.comparison": COMPARISON}):
        for r in results:
            key = f"{r['network']}.{r['upsample']}"
            mlflow.log_metrics({f"checkerboard_output_init/{key}": r["init"]["output"],
                                f"checkerboard_output_trained/{key}": r["trained"]["output"],
                                f"checkerboard_gradient_init/{key}": r["init"]["gradient"],
                                f"checkerboard_gradient_trained/{key}": r["trained"]["gradient"],
                                f"train_images_per_s/{key}": r["train_rate"],
                                f"predict_scans_per_s/{key}": r["predict_rate"],
                                f"forward_seconds_1539px/{key}": r["forward_1539"]})
        for path in figures.values():
            mlflow.log_artifact(str(path), "figures")
        mlflow.log_artifact(str(DOC))
    if any(not math.isfinite(r["trained"]["output"]) for r in results):
        raise SystemExit("a checkerboard score is not finite")
