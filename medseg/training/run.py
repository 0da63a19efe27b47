"""One tracked training job (one fold) and cross-validation bookkeeping.

These functions take explicit arguments; the CLI turns the workflow config
into them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.preprocessing.intensity import DEFAULT_INTENSITY
from medseg.preprocessing.manifest import manifest_fingerprint
from medseg.preprocessing.splits import read_splits
from medseg.tracking import (
    DESCRIPTION_TAG, RunLogger, best_metric_name, client_for, connect, dataset_input, describe_experiment,
    git_commit, metric_name, run_context_tags, save_runs_view, tolerant, without_active_run,
)
from medseg.training.data import load_cases
from medseg.training.network import SigmoidHead
from medseg.training.settings import TrainSettings
from medseg.training.trainer import Trainer, format_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run is logged.

    Attributes:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (one per dataset).
        registered_model: model registry name.
        alias: alias given to the chosen model version (e.g. "candidate").
        system_metrics: log CPU/GPU/memory use alongside the run.
    """

    tracking_uri: str
    experiment: str
    registered_model: str
    alias: str = "candidate"
    system_metrics: bool = True


def _pip_requirements() -> list[str]:
    """Pinned requirements for the logged model (skips MLflow's slow inference)."""
    import monai

    return [f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}",
            f"numpy=={np.__version__}"]


RUN_RECORD = "mlflow_run.json"
# The best epoch's predictions on the validation cases (report item).
VALIDATION_OVERLAYS = "validation_overlays.png"


@dataclass(frozen=True)
class RunRecord:
    """The MLflow run of a training output folder, written as soon as the run
    exists, so that a job killed before its first checkpoint is continued in
    the same run (no orphan RUNNING run per preemption).

    The record is used only for the same tracking store, settings and data
    (``settings_fingerprint``, ``data_fingerprint``); otherwise training
    starts afresh in a new run, as it does for ``last.pt``.
    """

    path: Path
    tracking_uri: str
    settings_fingerprint: str
    data_fingerprint: str

    def _key(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "settings_fingerprint": self.settings_fingerprint,
                "data_fingerprint": self.data_fingerprint}

    def read(self) -> str | None:
        """The recorded run ID if the record matches, else None."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in self._key().items()):
            return None
        return record.get("run_id") or None

    def write(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"run_id": run_id, **self._key()}, indent=1) + "\n")


def describe_fold(settings: TrainSettings, labels: Sequence[str], fold: int | str, n_train: int, n_val: int,
                  dataset: str, size: int, intensity: Mapping[str, float]) -> str:
    """A fold's run / model description for the MLflow UI (Markdown)."""
    return (
        f"Fold {fold} of the **{dataset}** cross-validation: trained on {n_train} cases, validated on {n_val} "
        f"(its held-out test cases are scored by the run `evaluation-fold{fold}`).\n\n"
        f"- network: {settings.network} ({settings.preset}, {settings.upsample} upsampling), one sigmoid channel "
        f"per label in the order {', '.join(labels)}\n"
        f"- recipe: {settings.epochs} epochs x {settings.samples_per_epoch or n_train} samples, batch "
        f"{settings.batch_size}, {settings.optimizer} lr {settings.learning_rate:g} ({settings.scheduler}), "
        f"Dice x {settings.lambda_dice:g} + BCE x {settings.lambda_ce:g}, augmentation "
        f"{'on' if settings.augment.enabled else 'off'}"
        f"{', soft (partial-volume) labels' if settings.soft_labels else ''}\n"
        f"- preprocessing: {size} x {size} px square canvas, intensities scaled between the "
        f"{intensity.get('lower_percentile', 0.5):g}th and {intensity.get('upper_percentile', 99.5):g}th "
        "percentiles to [0, 1]\n"
        "- best epoch: highest mean validation Dice (metrics `best/*`)"
    )


def log_model(model: torch.nn.Module, size: int, target: TrackingTarget, fold: int | str, *, run_id: str,
              best_epoch: int, best_metrics: Mapping[str, float], metadata: Mapping[str, Any] | None = None,
              description: str = "", tags: Mapping[str, str] | None = None) -> dict:
    """Log ``model`` (logits) as a probability model named ``fold<k>``,
    register it, alias it ``fold<k>``, and link it to its training run.

    The logged model maps float32 (N, 1, size, size) in [0, 1] to float32
    (N, C, size, size) probabilities. ``metadata`` (labels = channel order,
    size, intensity percentiles, tensor names) travels with it so
    prediction can preprocess new scans the same way. Its metrics are the
    best epoch's validation figures (``best/...``, at step ``best_epoch``),
    never the run's system metrics. ``tags`` go on the logged model and the
    model version; ``description`` on the model version.

    (The signature's tensors stay unnamed: MLflow's PyTorch flavour refuses
    a named tensor at ``pyfunc.predict`` time; the names are in the
    metadata's ``input``/``output``.)

    Returns:
        {"version", "model_uri", "model_id"}.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import infer_signature

    wrapped = SigmoidHead(model).cpu().eval()
    # Batch of 2: MLflow exports with torch.export, which would fix a batch
    # dimension of 1 (a "specialised" size) into the saved program.
    example = np.zeros((2, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    client = client_for(target.tracking_uri)
    run = client.get_run(run_id)
    tags = dict(tags or {})
    logged = mlflow.initialize_logged_model(name=f"fold{fold}", source_run_id=run_id, tags=tags,
                                            params=run.data.params, model_type="segmentation",
                                            experiment_id=run.info.experiment_id)
    info = without_active_run(
        mlflow.pytorch.log_model, wrapped, name=f"fold{fold}", signature=infer_signature(example, output),
        input_example=example, registered_model_name=target.registered_model, pip_requirements=_pip_requirements(),
        metadata=dict(metadata or {}), model_id=logged.model_id, tags=tags,
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=best_epoch)])
    if description:  # the model page's description (not a version tag: set after registering)
        client.set_logged_model_tags(logged.model_id, {DESCRIPTION_TAG: description})
    now = int(time.time() * 1000)
    values = {"best/epoch": float(best_epoch),
              **{best_metric_name(k): float(v) for k, v in best_metrics.items() if v is not None and v == v}}
    client.log_batch(run_id, metrics=[Metric(k, v, now, best_epoch, model_id=logged.model_id, run_id=run_id)
                                      for k, v in values.items()])
    version = str(info.registered_model_version)
    client.set_registered_model_alias(target.registered_model, f"fold{fold}", version)
    if description:
        client.update_model_version(target.registered_model, version, description=description)
    client.update_registered_model(
        target.registered_model,
        description=(f"medseg models of the {target.experiment} experiment: one version per trained fold "
                     f"(alias `fold<k>`); the cross-validation's choice has the alias `@{target.alias}`. Input "
                     "float32 (N, 1, S, S) in [0, 1]; output float32 (N, C, S, S) sigmoid probabilities, channel "
                     "order in the version's metadata (labels)."),
    )
    return {"version": version, "model_uri": f"models:/{target.registered_model}/{version}",
            "model_id": logged.model_id}


def train_fold(
    *,
    settings: TrainSettings,
    labels: Mapping[str, Sequence[str]],
    manifest: str | Path,
    splits: str | Path,
    fold: int,
    out_dir: str | Path,
    target: TrackingTarget,
    params: Mapping[str, str],
    config: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    intensity: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict:
    """Train one fold, tracked in MLflow; resumes from ``out_dir/last.pt``.

    Args:
        settings: training settings (already validated).
        labels: {label: source structures}; output channels in this order.
        manifest, splits: preprocessing outputs.
        fold: index into the splits' folds.
        out_dir: checkpoints, metrics.csv, curves, overlays, model.json.
        target: tracking store, experiment and registry names.
        params: flattened resolved config, logged as run parameters.
        config: the resolved config, logged as the artifact ``config.yaml``.
        parent_run_id: cross-validation parent run.
        intensity: the preprocessing's lower/upper percentiles, recorded
            with the model so that prediction normalises alike.
        tags: extra MLflow run tags (e.g. a comparison's name, by which the
            UI groups runs).

    Returns:
        The summary written to ``out_dir/model.json``.

    Raises:
        medseg.tracking.TrackingUnavailable: before any training work.
    """
    import mlflow

    out_dir = Path(out_dir)
    experiment_id = connect(target.tracking_uri, target.experiment)
    folds = read_splits(splits)["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"{splits}: fold {fold} does not exist (there are {len(folds)})")
    split = folds[fold]
    label_names = list(labels)
    train_cases = load_cases(manifest, split["train"], labels, soft_labels=settings.soft_labels)
    val_cases = load_cases(manifest, split["val"], labels)  # scored as masks, thresholded at half a pixel
    log.info("fold %d: %d training, %d validation cases", fold, len(train_cases.case_ids), len(val_cases.case_ids))

    dataset_fingerprint = manifest_fingerprint(manifest)
    data_fingerprint = hashlib.sha256(
        json.dumps([dataset_fingerprint, split["train"], split["val"], labels], sort_keys=True).encode()
    ).hexdigest()[:16]
    intensity = dict(intensity or DEFAULT_INTENSITY)
    trainer = Trainer(settings, label_names, train_cases, val_cases, out_dir,
                      on_epoch=lambda m: log.info("%s", format_progress(m, label_names)),
                      data_fingerprint=data_fingerprint, intensity=intensity,
                      dataset_fingerprint=dataset_fingerprint)
    trainer.try_resume()
    finished = out_dir / "model.json"
    if trainer.run_id and trainer.start_epoch > settings.epochs and finished.is_file():
        summary = json.loads(finished.read_text())
        if summary.get("run_id") == trainer.run_id:  # a rerun of a finished job: no second model version
            log.info("fold %d is already trained (%s, MLflow run %s): nothing to do", fold, finished, trainer.run_id)
            return summary
    tags = {
        "medseg.version": __version__,
        "medseg.role": "training",
        "git.commit": git_commit(),
        "dataset.fingerprint": dataset_fingerprint,
        "device": trainer.device.name,
        "fold": str(fold),
        "medseg.network": settings.network,
        "medseg.upsample": settings.upsample,
        **(tags or {}),
    }
    description = describe_fold(settings, label_names, fold, len(train_cases.case_ids), len(val_cases.case_ids),
                                target.experiment, trainer.size, intensity)
    params = {**params, "data.n_train_cases": str(len(train_cases.case_ids)),
              "data.n_val_cases": str(len(val_cases.case_ids))}
    run_record = RunRecord(out_dir / RUN_RECORD, target.tracking_uri, settings.fingerprint(), data_fingerprint)
    # A job killed before its first checkpoint left its run ID only in the record.
    continued = trainer.run_id or run_record.read()
    if continued:
        run = mlflow.start_run(run_id=continued, log_system_metrics=target.system_metrics)
        log.info("continuing MLflow run %s", continued)
        fresh = not trainer.history  # the first job may have died before logging its parameters
        if fresh:
            mlflow.set_tags({**tags, DESCRIPTION_TAG: description})
            logged = client_for(target.tracking_uri).get_run(continued).data.params
            # Only the missing ones: MLflow refuses to change a logged value.
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    else:
        fresh = True
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"fold{fold}", parent_run_id=parent_run_id,
                               tags=tags, description=description, log_system_metrics=target.system_metrics)
        run_record.write(run.info.run_id)
        mlflow.log_params(dict(params))
    if fresh:
        # Parallel fold jobs write these shared records at the same moment.
        tolerant("describing the experiment", describe_experiment, target.tracking_uri, experiment_id, label_names)
        tolerant("logging the dataset input", mlflow.log_input,
                 dataset_input(manifest, target.experiment, dataset_fingerprint), context="training")
        mlflow.log_artifact(str(splits))
    if config is not None:
        mlflow.log_dict(dict(config), "config.yaml")
    run_id = run.info.run_id
    trainer.run_id = run_id
    tracker = RunLogger(run_id, out_dir)
    trainer.tracker = tracker
    if trainer.history:
        # Epochs checkpointed by the killed job but not yet sent to MLflow.
        logged = tracker.call("get_metric_history", client_for(target.tracking_uri).get_metric_history, run_id,
                              metric_name("train_loss"))
        if logged is not None:
            steps = {m.step for m in logged}
            trainer.log_epochs([h for h in trainer.history if h["epoch"] not in steps])
    status = "FAILED"
    try:
        result = trainer.fit()
        tracker.log_artifact(out_dir / "curves.png")
        tracker.log_artifact(out_dir / "metrics.csv")
        best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
        trainer.eval_model.load_state_dict(best["model"])
        # The chosen model on the validation cases, for the report and the run.
        overlays = trainer.save_overlays(result.best_epoch, path=out_dir / VALIDATION_OVERLAYS,
                                         logits=trainer.predict_logits(trainer.val_cases.images))
        tracker.log_artifact(overlays)
        best_metrics = next((h for h in result.history if h["epoch"] == result.best_epoch), result.history[-1])
        best_val = {k: v for k, v in best_metrics.items() if k.startswith("val_")}
        model_metadata = {"labels": label_names, "size": trainer.size, "intensity": intensity}
        contract = {
            **model_metadata,
            "input": {"name": "image", "dtype": "float32", "shape": [-1, 1, trainer.size, trainer.size],
                      "meaning": "radiograph on the square canvas, intensities scaled to [0, 1]"},
            "output": {"name": "probabilities", "dtype": "float32",
                       "shape": [-1, len(label_names), trainer.size, trainer.size],
                       "channels": label_names, "meaning": "sigmoid probability per label (multi-label)"},
            "network": {"network": settings.network, "preset": settings.preset, "upsample": settings.upsample},
            "amp": settings.amp,  # prediction on CUDA autocasts as training did
            "dataset_fingerprint": dataset_fingerprint,
            "fold": int(fold),
        }
        version_tags = {"fold": str(fold), "dataset.fingerprint": dataset_fingerprint,
                        "best_epoch": str(result.best_epoch),
                        **{f"val_dice.{k[len('val_dice_'):]}": f"{v:.4f}" for k, v in best_val.items()
                           if k.startswith("val_dice_")}}
        registered = tracker.call(
            "log_model", log_model, trainer.eval_model, trainer.size, target, fold, run_id=run_id,
            best_epoch=result.best_epoch, best_metrics=best_val, metadata=contract, description=description,
            tags=version_tags,
        ) or {}
        summary: dict[str, Any] = {
            "fold": fold,
            "run_id": run_id,
            "parent_run_id": parent_run_id,
            "experiment": target.experiment,
            "tracking_uri": target.tracking_uri,
            "registered_model": target.registered_model,
            "model_version": registered.get("version"),
            "model_uri": registered.get("model_uri"),
            "model_id": registered.get("model_id"),
            "best_epoch": result.best_epoch,
            "best_metrics": best_val,
            **model_metadata,
            "tracking_offline": tracker.offline,
        }
        write_text_atomic(out_dir / "model.json", json.dumps(summary, indent=1) + "\n")
        status = "FINISHED"
        if tracker.offline:
            log.warning("MLflow was unreachable during training: results are in %s", out_dir)
        return summary
    finally:
        tracker.call("end_run", mlflow.end_run, status=status)


def start_cv_run(target: TrackingTarget, name: str, params: Mapping[str, str], tags: Mapping[str, str],
                 description: str = "") -> str:
    """Create the parent run of a cross-validation; returns its ID.

    The run stays RUNNING while its folds train and are evaluated:
    :func:`finish_cv_run` ends it, so its duration covers theirs.
    """
    from mlflow.entities import Param

    experiment_id = connect(target.tracking_uri, target.experiment)
    client = client_for(target.tracking_uri)
    all_tags = {**run_context_tags(), **tags, "medseg.role": "cross-validation"}
    if description:
        all_tags[DESCRIPTION_TAG] = description
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def evaluation_means(evaluations: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """Mean over folds of their held-out test figures.

    Args:
        evaluations: per fold, {label: {"dice_mean": .., "jaccard_mean": ..,
            "hd95_mm_mean": .., "assd_mm_mean": ..}} (rows of the
            evaluation's summary.csv).

    Returns:
        {"test/<metric>/<label>": mean over the folds}; a non-finite fold
        value (a missed structure makes a distance mean infinite) leaves
        the metric out.
    """
    from medseg.evaluation.metrics import METRIC_NAMES

    values: dict[str, list[float]] = {}
    for evaluation in evaluations:
        for label, row in evaluation.items():
            for metric in METRIC_NAMES:
                if f"{metric}_mean" in row:
                    values.setdefault(f"test/{metric}/{label}", []).append(float(row[f"{metric}_mean"]))
    return {k: float(np.mean(v)) for k, v in values.items()
            if len(v) == len(evaluations) and all(np.isfinite(v))}


CV_CHOICES = ("best_fold", "ensemble")


def finish_cv_run(target: TrackingTarget, parent_run_id: str, fold_summaries: Sequence[dict],
                  test_metrics: Mapping[str, float] | None = None, choice: str = "best_fold") -> dict:
    """Summarise the folds into the parent run, alias the best fold's model
    and end the parent run.

    ``choice`` says what predicts new scans through ``models/summary.json``:
    "best_fold" (one network, fastest) or "ensemble" (every fold's model,
    probabilities averaged: nnU-Net's default). The summary lists the folds
    (``folds``) and their registered models (``fold_model_uris``, as
    ``models:/<name>@fold<k>``) either way; the registry alias stays on the
    best fold, since an alias names one version.

    Choice: the fold with the best mean validation Dice becomes
    ``models:/<name>@<alias>`` (a single network keeps inference fast; the
    other folds stay registered as ``@fold<k>``); its logged model gets the
    tag ``registry.alias=<alias>`` so the choice shows on the model page.

    The parent run gets the folds' mean best-epoch figures under the fold
    runs' names (``best/val_dice/<label>``, ...), ``test_metrics`` (e.g.
    :func:`evaluation_means`), and ends FINISHED now, after its folds.

    Folds trained while MLflow was unreachable have no registered model: the
    best fold is then chosen among all folds from their model.json's
    validation metrics, the summary says so (``model_uri`` None: the fold's
    model.json and best.pt are the model) and a warning is logged. If, then,
    the store cannot be reached either, the summary is still returned
    (``tracking_offline`` True). With registered folds, an unreachable store
    is an error (the alias is what the run produces).
    """
    from mlflow.entities import Metric, RunStatus

    if not fold_summaries:
        raise ValueError("no fold summaries")
    if choice not in CV_CHOICES:
        raise ValueError(f"unknown cross-validation choice {choice!r}; choose from {', '.join(CV_CHOICES)}")
    registered = [s for s in fold_summaries if s.get("model_version")]

    def score(summary: dict) -> float:
        return summary["best_metrics"].get("val_dice_mean", -1.0)

    best = max(registered or fold_summaries, key=score)
    means: dict[str, float] = {}
    for key in best["best_metrics"]:
        values = [s["best_metrics"][key] for s in fold_summaries if key in s["best_metrics"]]
        means[f"cv_mean_{key}"] = float(np.mean(values))
    summary: dict[str, Any] = {
        "parent_run_id": parent_run_id,
        "best_fold": best["fold"],
        "model_uri": f"models:/{target.registered_model}@{target.alias}" if registered else None,
        "model_version": best.get("model_version"),
        "tracking_uri": target.tracking_uri,
        "choice": choice if len(fold_summaries) > 1 else "best_fold",
        "folds": [s["fold"] for s in fold_summaries],
        # Versions, not the @fold<k> aliases: a retrained fold moves its alias.
        "fold_model_uris": [f"models:/{target.registered_model}/{s['model_version']}" if s.get("model_version")
                            else None for s in fold_summaries],
        **means,
        **({"test_means": dict(test_metrics)} if test_metrics else {}),
    }
    if not registered:
        log.warning("no fold has a registered model (MLflow was unreachable while training?): best fold %s chosen "
                    "from the folds' validation metrics; use its model.json/best.pt, no @%s alias was set",
                    best["fold"], target.alias)
    if len(registered) < len(fold_summaries):
        summary["unregistered_folds"] = sorted(s["fold"] for s in fold_summaries if not s.get("model_version"))
    try:
        connect(target.tracking_uri, target.experiment)
        client = client_for(target.tracking_uri)
        now = int(time.time() * 1000)
        logged = {best_metric_name(k[len("cv_mean_"):]): v for k, v in means.items()}
        logged.update(test_metrics or {})
        client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in logged.items()])
        client.set_tag(parent_run_id, "best_fold", str(best["fold"]))
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        summary["experiment_id"] = experiment_id
        # Columns per label, whether or not the fold means exist (a structure
        # missed in one fold leaves its mean distance out, not the others' values).
        labels = list(dict.fromkeys(label for s in fold_summaries for label in s.get("labels", [])))
        columns = [f"best/val_dice/{label}" for label in [*labels, "mean"]]
        columns += [f"test/{metric}/{label}" for metric in ("dice", "jaccard", "hd95_mm") for label in labels]
        summary["runs_view"] = save_runs_view(target.tracking_uri, experiment_id, columns)
        folds = ", ".join(str(s["fold"]) for s in sorted(fold_summaries, key=lambda s: str(s["fold"])))
        description = client.get_run(parent_run_id).data.tags.get(DESCRIPTION_TAG, "").split("\n\nFolds trained:")[0]
        client.set_tag(parent_run_id, DESCRIPTION_TAG,
                       f"{description}\n\nFolds trained: {folds}; best fold {best['fold']} (registry alias "
                       f"`{target.alias}`). New scans are predicted by "
                       + (f"the ensemble of folds {folds} (probabilities averaged)." if summary["choice"] == "ensemble"
                          else f"the best fold's model."))
        client.set_tag(parent_run_id, "n_folds", str(len(fold_summaries)))
        client.set_tag(parent_run_id, "cv_choice", summary["choice"])
        if registered:
            client.set_registered_model_alias(target.registered_model, target.alias, best["model_version"])
            alias_tag = "registry.alias"
            for fold in fold_summaries:
                if not fold.get("model_id"):
                    continue
                if fold is best:
                    client.set_logged_model_tags(fold["model_id"], {alias_tag: target.alias})
                elif alias_tag in client.get_logged_model(fold["model_id"]).tags:
                    client.delete_logged_model_tag(fold["model_id"], alias_tag)
        client.set_terminated(parent_run_id, RunStatus.to_string(RunStatus.FINISHED))
        summary["tracking_offline"] = False
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; the summary on disk matters more
        if registered:
            raise  # the alias is the product: let the job fail and be rerun
        log.warning("could not record the cross-validation summary in MLflow (%s: %s); it is in the summary file",
                    type(err).__name__, str(err)[:300])
        summary["tracking_offline"] = True
    return summary
