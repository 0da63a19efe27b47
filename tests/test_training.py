"""Training: learning really happens, MLflow holds the run, resume is exact,
bad configs and unreachable trackers are refused before any work."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from services import free_port

from medseg.phantoms.write import write_phantom_dataset
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
from medseg.preprocessing.splits import make_splits, write_splits
from medseg.tracking import client_for
from medseg.tracking_server import start_mlflow_server, stop_process_group, wait_until_healthy
from medseg.training.data import AugmentSettings

MEDSEG = [sys.executable, "-m", "medseg"]


def _config(repo_root: Path, tmp: Path, **train) -> Path:
    config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    config["dataset"] = "unit"
    config["train"].update(train)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _dataset(tmp: Path, n: int, size: int, shape=(256, 224), seed: int = 1) -> tuple[Path, Path]:
    write_phantom_dataset(tmp / "raw", n=n, seed=seed, shape=shape)
    result = preprocess_dataset(DatasetSpec(images=tmp / "raw" / "images", masks_root=tmp / "raw" / "masks"),
                                PreprocessSettings(size=size), tmp / "pre", workers=1)
    assert not result.failures
    splits = tmp / "splits.json"
    write_splits(splits, make_splits([r["case_id"] for r in result.rows], "kfold", k=4, seed=0, val_fraction=0.2))
    return result.manifest_path, splits


def _train(config: Path, manifest: Path, splits: Path, out: Path, uri: str, *extra: str, env=None, check=True):
    proc = subprocess.run(
        [*MEDSEG, "train", "--config", str(config), "--manifest", str(manifest), "--splits", str(splits),
         "--fold", "0", "--out", str(out), "--tracking-uri", uri, *extra],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo_root):
    """One CPU training of ~1 minute on 32 phantoms at 128 px."""
    tmp = tmp_path_factory.mktemp("learn")
    manifest, splits = _dataset(tmp, n=32, size=128)
    config = _config(repo_root, tmp, preset="cpu_tiny", epochs=12, samples_per_epoch=96, learning_rate=0.01,
                     overlay_every=4)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = _train(config, manifest, splits, tmp / "fold0", uri)
    return {"tmp": tmp, "uri": uri, "summary": json.loads((tmp / "fold0" / "model.json").read_text()),
            "stderr": proc.stderr}


def test_learning_happens(trained):
    metrics = trained["summary"]["best_metrics"]
    assert metrics["val_dice_lungs"] > 0.8, metrics
    assert metrics["val_dice_heart"] > 0.8, metrics
    # Progress per epoch: loss, Dice per label, images/s, ETA.
    lines = [l for l in trained["stderr"].splitlines() if "epoch 12/12" in l]
    assert lines and "Dice heart" in lines[0] and "img/s" in lines[0] and "ETA" in lines[0]


def test_mlflow_run_holds_params_metrics_artifacts_model(trained):
    client = client_for(trained["uri"])
    run = client.get_run(trained["summary"]["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.preset"] == "cpu_tiny" and params["train.epochs"] == "12"
    assert params["labels.lungs"] == "['left_lung', 'right_lung']"
    assert params["train.augment.rotate_deg"] == "7.0"
    tags = run.data.tags
    for tag in ("git.commit", "medseg.version", "dataset.fingerprint", "device", "fold"):
        assert tags.get(tag), tag
    assert tags["device"].startswith("cpu") and tags["medseg.role"] == "training"
    assert "Fold 0" in tags["mlflow.note.content"] and "heart, lungs, clavicles" in tags["mlflow.note.content"]
    assert "None" not in params.values()  # unset settings are left out, not logged as "None"
    assert params["data.n_train_cases"] == str(len(json.loads((trained["tmp"] / "splits.json").read_text())
                                                   ["folds"][0]["train"]))
    # Grouped names (MLflow's chart view groups by the part before "/").
    for metric in ("train/loss", "val/loss", "val/dice/heart", "val/dice/lungs", "val/dice/clavicles",
                   "val/dice/mean", "val/jaccard/lungs", "train/learning_rate", "perf/epoch_seconds",
                   "perf/images_per_second"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(1, 13)), metric
    assert not any("_" in k.split("/")[0] for k in run.data.metrics if not k.startswith("system/")), run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics on
    summary = trained["summary"]
    best_epoch = summary["best_epoch"]
    assert run.data.metrics["best/epoch"] == best_epoch
    assert run.data.metrics["best/val_dice/lungs"] == pytest.approx(summary["best_metrics"]["val_dice_lungs"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/dice/mean")}
    assert history[best_epoch] == max(history.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "metrics.csv", "splits.json", "validation_overlays.png"} <= artifacts
    # Overlays as an image series with steps (the UI's slider over epochs).
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("+step+4+" in p for p in images) and any("+step+12+" in p for p in images), images
    # The manifest is the run's dataset input, its digest the dataset fingerprint.
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == tags["dataset.fingerprint"][:32]
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    # The logged model: named after its fold, linked to the run at its best
    # epoch, carrying the validation figures and no system metrics.
    (output,) = run.outputs.model_outputs
    assert output.step == best_epoch and output.model_id == summary["model_id"]
    logged = client.get_logged_model(summary["model_id"])
    assert logged.name == "fold0" and logged.source_run_id == run.info.run_id
    assert logged.tags["mlflow.note.content"].startswith("Fold 0 of the")  # the model page's description
    model_metrics = {m.key: m.value for m in logged.metrics}
    assert model_metrics["best/val_dice/heart"] == pytest.approx(summary["best_metrics"]["val_dice_heart"])
    assert {"best/val_jaccard/clavicles", "best/epoch"} <= set(model_metrics)
    assert not [k for k in model_metrics if k.startswith("system/")], model_metrics
    # No patient-identifying field anywhere in params, tags or artifact names.
    text = json.dumps([params, tags, sorted(artifacts), images])
    assert "Secret" not in text and "SECRETID" not in text

    mlflow.set_tracking_uri(trained["uri"])
    mlflow.set_registry_uri(trained["uri"])
    version = client.get_model_version_by_alias("medseg-unit", "fold0")
    assert version.run_id == run.info.run_id
    assert version.tags["fold"] == "0" and version.tags["dataset.fingerprint"] == tags["dataset.fingerprint"]
    assert float(version.tags["val_dice.lungs"]) == pytest.approx(summary["best_metrics"]["val_dice_lungs"], abs=1e-4)
    assert "Fold 0" in version.description and client.get_registered_model("medseg-unit").description
    info = mlflow.models.get_model_info("models:/medseg-unit@fold0")
    assert info.metadata["output"]["channels"] == ["heart", "lungs", "clavicles"]
    assert info.metadata["input"]["shape"] == [-1, 1, 128, 128]
    model = mlflow.pyfunc.load_model("models:/medseg-unit@fold0")
    # The registered model is the best checkpoint: on real preprocessed
    # images (and on noise) it gives best.pt's probabilities, sigmoid of the
    # network's logits, as medseg's own loader builds it.
    from medseg.inference.model import load_model
    from medseg.nifti import load_nifti_2d
    from medseg.preprocessing.manifest import read_manifest

    pre = trained["tmp"] / "pre"
    images = [load_nifti_2d(pre / image)[0] for image in read_manifest(pre / "manifest.csv")["image"][:3]]
    noise = np.random.default_rng(0).random((1, 128, 128), dtype=np.float32)
    batch = np.concatenate([np.stack(images)[:, np.newaxis].astype(np.float32), noise[np.newaxis]])
    assert batch.shape == (4, 1, 128, 128) and batch[:3].std() > 0.1
    probabilities = np.asarray(model.predict(batch))
    checkpoint = load_model(str(trained["tmp"] / "fold0" / "best.pt"))
    assert checkpoint.labels == ["heart", "lungs", "clavicles"] and checkpoint.size == 128
    with torch.no_grad():
        expected = torch.sigmoid(checkpoint.module.net(torch.from_numpy(batch))).numpy()
    assert probabilities.shape == expected.shape == (4, 3, 128, 128)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
    # A trained model, not a constant: the phantoms' lungs are found, the background is not lung.
    assert expected[:3, 1].max() > 0.9 and expected[:3, 1].min() < 0.1


def test_rerun_of_a_finished_training_does_nothing(trained):
    """Running the same finished job again registers no second model version."""
    tmp = trained["tmp"]
    client = client_for(trained["uri"])
    before = client.search_model_versions("name='medseg-unit'")
    proc = _train(tmp / "config.yaml", tmp / "pre" / "manifest.csv", tmp / "splits.json", tmp / "fold0",
                  trained["uri"])
    assert "fold 0 is already trained" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp / "fold0" / "model.json").read_text()) == trained["summary"]
    after = client.search_model_versions("name='medseg-unit'")
    assert sorted(v.version for v in after) == sorted(v.version for v in before)


TRACKED = ("train/loss", "val/loss", "val/dice/heart", "val/dice/lungs", "val/dice/clavicles", "val/dice/mean",
           "train/learning_rate")


def _train_until_killed(command: list[str], log_path: Path, kill_when) -> int:
    """Start `medseg train`, SIGKILL it from outside as soon as
    ``kill_when(log_text)`` is true; returns its exit code (-9 if killed)."""
    with open(log_path, "w") as log:
        train = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while train.poll() is None and time.monotonic() < deadline:
            if kill_when(log_path.read_text()):
                train.kill()  # SIGKILL: no handler, no cleanup, as a preempted job
                break
            time.sleep(0.001)
        return train.wait(timeout=60)
    finally:
        if train.poll() is None:
            train.kill()


def test_resume_after_outside_kills_matches_uninterrupted_run(tmp_path, repo_root):
    """Killed from outside twice (at a random moment of the epochs, then right
    after an epoch's metrics.csv row, i.e. between logging and checkpoint), then
    resumed: the same final weights, the same MLflow run, and each metric's
    history step by step as an uninterrupted run's (a step logged twice fails)."""
    import random

    manifest, splits = _dataset(tmp_path, n=10, size=64, shape=(128, 128))
    epochs = 6
    config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=epochs, samples_per_epoch=16, batch_size=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _train(config, manifest, splits, tmp_path / "straight", uri)
    # The epochs' span (training + validation), from the uninterrupted run.
    with open(tmp_path / "straight" / "metrics.csv") as f:
        span = 1.5 * sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))
    command = [*MEDSEG, "train", "--config", str(config), "--manifest", str(manifest), "--splits", str(splits),
               "--fold", "0", "--out", str(tmp_path / "resumed"), "--tracking-uri", uri]
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 0.5) * span
    metrics_csv = tmp_path / "resumed" / "metrics.csv"

    def rows() -> int:
        return len(metrics_csv.read_text().splitlines()) - 1 if metrics_csv.exists() else 0

    # 1. At a random moment of the first half of the epochs once the data is
    #    loaded (before the first checkpoint too), as preemption strikes.
    loaded_at: list[float] = []

    def at_random_moment(text: str) -> bool:
        if "training," in text and not loaded_at:
            loaded_at.append(time.monotonic())
        # Half the epochs logged ends the wait whatever the clock says: this
        # run may go faster than the straight one whose pace set the delay
        # (a parallel test worker busy then, idle now).
        return bool(loaded_at) and (time.monotonic() - loaded_at[0] >= delay or rows() >= epochs // 2)

    first = _train_until_killed(command, tmp_path / "kill1.log", at_random_moment)
    done_first = rows()
    context = f"random seed {seed}: first kill {delay:.2f} s into the epochs, {done_first} metrics.csv rows"
    assert first == -9 and done_first < epochs - 1, context
    # 2. As soon as a further epoch's row is in metrics.csv (the second at
    #    least, so a checkpoint exists): between that epoch's metrics and its
    #    checkpoint / MLflow logging.
    second = _train_until_killed(command, tmp_path / "kill2.log", lambda _: rows() > max(done_first, 1))
    assert second == -9, context
    checkpointed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"]
    resumed = _train(config, manifest, splits, tmp_path / "resumed", uri)
    # The last job went on from the checkpoint: it redid no checkpointed epoch.
    assert f"resuming from {tmp_path / 'resumed' / 'last.pt'} at epoch {checkpointed + 1}" in resumed.stderr, context
    assert f"epoch {checkpointed}/{epochs}" not in resumed.stderr, context
    assert "continuing MLflow run" in resumed.stderr, context

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    again = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert again["epoch"] == straight["epoch"] == epochs
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} ({context})")
    assert [h["epoch"] for h in again["history"]] == list(range(1, epochs + 1))
    # One MLflow run for the interrupted training, continued by every restart.
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 2, (context, [(r.info.run_id, r.info.status) for r in runs])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert again["mlflow_run_id"] != straight["mlflow_run_id"]
    assert json.loads((tmp_path / "resumed" / "mlflow_run.json").read_text())["run_id"] == again["mlflow_run_id"]
    for metric in TRACKED:
        # Sorted by step, duplicates kept: a step logged twice fails.
        expected = sorted(client.get_metric_history(straight["mlflow_run_id"], metric), key=lambda m: m.step)
        got = sorted(client.get_metric_history(again["mlflow_run_id"], metric), key=lambda m: m.step)
        assert [m.step for m in got] == [m.step for m in expected] == list(range(1, epochs + 1)), (metric, context)
        np.testing.assert_allclose([m.value for m in got], [m.value for m in expected], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{metric} ({context})")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"network": "resnet9000"}, "unknown network 'resnet9000'"),
        ({"upsample": "magic"}, "unknown upsampling 'magic'"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"optimiser": "adamw"}, "unknown train setting(s): optimiser"),
        # A quoted "false" is text (and text is truthy): refused, not trained with.
        ({"soft_labels": "false"}, "train.soft_labels must be true or false, got 'false'"),
        ({"epochs": "10"}, "train.epochs must be a whole number, got '10'"),
        ({"augment": {"elastic": 1}}, "train.augment.elastic must be true or false, got 1"),
        ({"learning_rate": "1e-3"}, "train.learning_rate must be a number, got '1e-3' (YAML reads"),
        ({"augment": "no"}, "train.augment must be a mapping of settings, got 'no'"),
    ],
)
def test_config_errors_refused_before_any_work(tmp_path, repo_root, override, message, caplog):
    # In-process (medseg's main), not a subprocess: each would spend seconds importing torch.
    from medseg.cli import main

    config = _config(repo_root, tmp_path, **override)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level("ERROR", logger="medseg"):
        rc = main(["train", "--config", str(config), "--manifest", str(tmp_path / "missing.csv"), "--splits",
                   str(tmp_path / "missing.json"), "--fold", "0", "--out", str(tmp_path / "out"),
                   "--tracking-uri", uri])
    assert rc == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_fast(tmp_path, repo_root):
    port = free_port()  # nobody listens on it
    manifest, splits = _dataset(tmp_path, n=6, size=64, shape=(128, 128))
    config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=1)
    start = time.monotonic()
    proc = _train(config, manifest, splits, tmp_path / "out", "", check=False,
                  env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert f"http://127.0.0.1:{port}" in proc.stderr and "cannot be used" in proc.stderr
    assert elapsed < 60
    assert not (tmp_path / "out" / "last.pt").exists()


def test_cv_finish_without_registered_models_still_summarises(tmp_path, repo_root):
    """Every fold trained offline (no model version): cv-finish picks the best
    fold from the model.json validation metrics, warns, writes the summary
    and exits 0."""
    config = _config(repo_root, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    parent = client.create_run(client.create_experiment("unit"), run_name="cross-validation").info.run_id
    (tmp_path / "cv_run.json").write_text(json.dumps({"parent_run_id": parent}))
    folds = []
    for fold, dice in ((0, 0.70), (1, 0.80), (2, 0.75)):
        path = tmp_path / f"fold{fold}.json"
        path.write_text(json.dumps({"fold": fold, "run_id": None, "model_version": None, "model_uri": None,
                                    "best_epoch": 3, "tracking_offline": True,
                                    "best_metrics": {"val_dice_mean": dice, "val_loss": 1.0 - dice}}))
        folds.append(str(path))
    proc = subprocess.run([*MEDSEG, "cv-finish", "--config", str(config), "--parent-run-file",
                           str(tmp_path / "cv_run.json"), "--tracking-uri", uri, "--out",
                           str(tmp_path / "summary.json"), *folds, "--choice", "ensemble"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no fold has a registered model" in proc.stderr and "best fold 1 chosen" in proc.stderr
    assert "new scans are predicted by the ensemble of folds 0, 1, 2" in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["choice"] == "ensemble" and summary["folds"] == [0, 1, 2]
    assert summary["fold_model_uris"] == [None, None, None]  # offline folds: their best.pt beside summary.json
    assert summary["best_fold"] == 1 and summary["model_uri"] is None and summary["model_version"] is None
    assert summary["unregistered_folds"] == [0, 1, 2] and summary["tracking_offline"] is False
    assert summary["cv_mean_val_dice_mean"] == pytest.approx(0.75)
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["best/val_dice/mean"] == pytest.approx(0.75)  # the folds' own metric name
    assert parent_run.data.tags["best_fold"] == "1"
    assert parent_run.info.status == "FINISHED"  # ended by cv-finish


def test_tracking_server_lost_mid_training_keeps_everything(tmp_path, repo_root):
    """A real `mlflow server` stopped during training: training finishes, says
    where the results are, and loses nothing on disk."""
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", port=port,
                                 workers=1)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, 90, server)
        manifest, splits = _dataset(tmp_path, n=8, size=64, shape=(128, 128))
        config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=12, samples_per_epoch=16, batch_size=4)
        text = train_interrupted(config, manifest, splits, tmp_path / "out", url, epochs=12, at_epoch=3,
                                 interrupt=lambda: stop_process_group(server))  # the server goes away
    finally:
        stop_process_group(server)
    assert_offline_training_kept_everything(tmp_path / "out", text, epochs=12)


def train_interrupted(config: Path, manifest: Path, splits: Path, out: Path, uri: str, *, epochs: int,
                      at_epoch: int, interrupt, timeout_s: float = 300) -> str:
    """`medseg train` with MLFLOW_TRACKING_URI=uri; calls interrupt() once
    epoch ``at_epoch`` is logged; asserts exit 0; returns the log."""
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log:
        train = subprocess.Popen(
            [*MEDSEG, "train", "--config", str(config), "--manifest", str(manifest), "--splits", str(splits),
             "--fold", "0", "--out", str(out)],
            stderr=log, stdout=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        )
        try:
            deadline = time.monotonic() + 120
            while f"epoch {at_epoch}/{epochs}" not in log_path.read_text():
                assert train.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.2)
            interrupt()  # the tracking server goes away mid-training
            assert train.wait(timeout=timeout_s) == 0, log_path.read_text()[-3000:]
        finally:
            if train.poll() is None:
                train.kill()
    return log_path.read_text()


def assert_offline_training_kept_everything(out: Path, log_text: str, epochs: int) -> None:
    """Training that lost its tracking server finished, said where its results
    are, and lost nothing on disk."""
    assert f"epoch {epochs}/{epochs}" in log_text and "MLflow was unreachable during training" in log_text
    summary = json.loads((out / "model.json").read_text())
    assert summary["tracking_offline"] is True and summary["model_uri"] is None
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert len((out / "metrics.csv").read_text().splitlines()) == epochs + 1  # header + one row per epoch
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"] == epochs
    # The model is still usable: predict falls back to best.pt beside model.json.
    from medseg.inference.model import load_model

    assert load_model(str(out / "model.json")).labels == ["heart", "lungs", "clavicles"]


def test_cpu_threads_follow_the_cpus_the_job_was_given():
    """A SLURM job (or `taskset`) may run on fewer CPUs than the node has:
    torch's threads follow the affinity mask, not os.cpu_count()."""
    import shutil

    if shutil.which("taskset") is None:
        from requirements_switch import skip_or_fail

        skip_or_fail("taskset (util-linux) not available")
    code = ("import torch; from medseg.training.trainer import pick_device; pick_device('cpu', 'auto'); "
            "print(torch.get_num_threads())")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert pinned.stdout.strip() == "1"
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert free.stdout.strip() == str(len(os.sched_getaffinity(0)))


def test_training_curves_use_label_colours_and_whole_epoch_ticks(tmp_path):
    """curves.png: Dice lines in the project's label colours (heart red, lungs
    green, clavicles blue), the mean black; epoch ticks whole numbers even for
    a short run; loss lines and panels named."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from medseg.training.trainer import save_training_curves, training_curves_figure
    from medseg.visualise import label_colour

    labels = ["heart", "lungs", "clavicles"]
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_dice_mean": 0.2 * e,
                **{f"val_dice_{name}": 0.2 * e + 0.05 * i for i, name in enumerate(labels)}} for e in (1, 2, 3)]
    fig = training_curves_figure(history, labels)
    try:
        fig.canvas.draw()
        ax_loss, ax_dice = fig.axes
        dice_lines = {line.get_label(): line for line in ax_dice.get_lines()}
        assert list(dice_lines) == [*labels, "mean of labels"]
        for index, name in enumerate(labels):
            assert to_rgb(dice_lines[name].get_color()) == label_colour(name, index)
        assert to_rgb(dice_lines["mean of labels"].get_color()) == (0.0, 0.0, 0.0)
        assert [line.get_label() for line in ax_loss.get_lines()] == ["training loss", "validation loss"]
        for ax in (ax_loss, ax_dice):
            assert ax.get_legend() is not None and ax.get_title() and ax.get_xlabel() == "epoch"
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert fig.get_suptitle() == "Training curves, 3 epochs"
    finally:
        plt.close(fig)
    save_training_curves(tmp_path / "curves.png", history, labels)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ema_weights_are_validated_checkpointed_and_resumed_exactly(tmp_path):
    """train.ema_decay: best.pt's "model" (what prediction loads) is the
    weights' moving average, not the optimised weights, and a run stopped
    after epoch 1 and resumed ends with the uninterrupted run's averages."""
    from medseg.inference.model import load_model
    from medseg.structures import DEFAULT_LABELS
    from medseg.training.data import load_cases
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    manifest, splits = _dataset(tmp_path, n=10, size=64)
    fold = json.loads(splits.read_text())["folds"][0]
    train = load_cases(manifest, fold["train"], DEFAULT_LABELS)
    val = load_cases(manifest, fold["val"], DEFAULT_LABELS)
    settings = TrainSettings(preset="cpu_tiny", epochs=2, samples_per_epoch=16, ema_decay=0.9)

    Trainer(settings, list(DEFAULT_LABELS), train, val, tmp_path / "whole").fit()
    last = torch.load(tmp_path / "whole" / "last.pt", map_location="cpu", weights_only=False)
    assert last["ema_n_averaged"] == 4  # 2 epochs x 2 steps of 8
    differs = [k for k in last["model"] if not torch.equal(last["model"][k], last["train_model"][k])]
    assert differs, "the averaged weights equal the optimised ones: no averaging happened"
    loaded = load_model(str(tmp_path / "whole" / "best.pt"))
    best = torch.load(tmp_path / "whole" / "best.pt", map_location="cpu", weights_only=False)
    for key, value in loaded.module.net.state_dict().items():
        assert torch.equal(value, best["model"][key])

    class Stop(Exception):
        pass

    def stop_after_first(metrics):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(settings, list(DEFAULT_LABELS), train, val, tmp_path / "split", on_epoch=stop_after_first).fit()
    resumed = Trainer(settings, list(DEFAULT_LABELS), train, val, tmp_path / "split")
    assert resumed.try_resume() is not None and resumed.start_epoch == 2
    resumed.fit()
    again = torch.load(tmp_path / "split" / "last.pt", map_location="cpu", weights_only=False)
    for part in ("model", "train_model"):
        for key in last[part]:
            torch.testing.assert_close(again[part][key], last[part][key], rtol=0, atol=1e-6)


def test_settings_fingerprint_unchanged_by_settings_added_later():
    """Checkpoints written before train.ema_decay existed still resume: the
    fingerprint of settings that leave it at its default is the one medseg
    0.x computed before (values measured at commit 44abe7f)."""
    from medseg.training.settings import TrainSettings

    assert TrainSettings().fingerprint() == "36e8e872359d58c5"
    assert TrainSettings(preset="cpu_tiny", epochs=3).fingerprint() == "aa3ad205d407998f"
    assert TrainSettings(ema_decay=0.9).fingerprint() != TrainSettings().fingerprint()
    assert TrainSettings(patch_size=32).fingerprint() != TrainSettings().fingerprint()
    assert TrainSettings(soft_labels=True).fingerprint() != TrainSettings().fingerprint()


def test_patch_training_samples_patches_and_validates_whole_images(tmp_path):
    """train.patch_size: the network is optimised on P x P patches of the
    preprocessed images, but validation and the checkpoint's contract are
    the whole image (prediction needs no patches); sizes that the network
    cannot halve 4 times, or larger than the images, are refused."""
    from medseg.structures import DEFAULT_LABELS
    from medseg.training.data import load_cases
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    manifest, splits = _dataset(tmp_path, n=10, size=64)
    fold = json.loads(splits.read_text())["folds"][0]
    train = load_cases(manifest, fold["train"], DEFAULT_LABELS)
    val = load_cases(manifest, fold["val"], DEFAULT_LABELS)
    settings = TrainSettings(preset="cpu_tiny", epochs=1, samples_per_epoch=16, patch_size=32)
    for augment in (True, False):
        trainer = Trainer(dataclasses.replace(settings, augment=AugmentSettings(enabled=augment)),
                          list(DEFAULT_LABELS), train, val, tmp_path / f"run-{augment}")
        shapes = {tuple(b["image"].shape[-2:]) for b in trainer._loader(1)}
        assert shapes == {(32, 32)}, shapes
    trainer.fit()
    best = torch.load(tmp_path / "run-False" / "best.pt", map_location="cpu", weights_only=False)
    assert best["size"] == 64 and best["settings"]["patch_size"] == 32
    assert trainer._last_val_logits.shape[-2:] == (64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainSettings(patch_size=40)
    with pytest.raises(ValueError, match="larger than the preprocessed size"):
        Trainer(TrainSettings(preset="cpu_tiny", patch_size=128), list(DEFAULT_LABELS), train, val, tmp_path / "x")


def test_soft_labels_train_on_partial_volume_shares_and_validate_masks(tmp_path):
    """train.soft_labels: the training targets are each pixel's share of a
    structure (in [0, 1], interpolated bilinearly by the spatial
    augmentation), the validation targets stay the thresholded masks, and a
    manifest without the fractions is refused with what to do."""
    from medseg.errors import InputError
    from medseg.structures import DEFAULT_LABELS
    from medseg.training.data import augmentation, load_cases
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    manifest, splits = _dataset(tmp_path, n=8, size=64)
    fold = json.loads(splits.read_text())["folds"][0]
    binary = load_cases(manifest, fold["train"], DEFAULT_LABELS)
    soft = load_cases(manifest, fold["train"], DEFAULT_LABELS, soft_labels=True)
    assert set(torch.unique(binary.labels).tolist()) == {0.0, 1.0}
    shares = soft.labels[(soft.labels > 0) & (soft.labels < 1)]
    assert 0 < soft.labels.min() + 1e-6 and soft.labels.max() <= 1 and shares.numel() > 100
    assert ((soft.labels >= 0.5) == (binary.labels == 1)).float().mean() > 0.999
    torch.testing.assert_close(soft.images, binary.images)

    augment = AugmentSettings(probability=1.0, elastic=False, intensity=False, noise_std=0.0, blur=False)
    sample = {"image": soft.images[0], "label": binary.labels[0]}
    for soft_labels, expect_shares in ((False, False), (True, True)):
        out = augmentation(augment, 64, soft_labels=soft_labels).set_random_state(0)(dict(sample))["label"]
        values = torch.as_tensor(out)
        assert bool(((values > 0.01) & (values < 0.99)).any()) is expect_shares

    val = load_cases(manifest, fold["val"], DEFAULT_LABELS)
    settings = TrainSettings(preset="cpu_tiny", epochs=1, samples_per_epoch=8, soft_labels=True)
    trainer = Trainer(settings, list(DEFAULT_LABELS), soft, val, tmp_path / "run")
    trainer.fit()
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=False)
    assert best["settings"]["soft_labels"] is True
    assert set(torch.unique(trainer.val_cases.labels).tolist()) == {0.0, 1.0}

    old = manifest.parent / "old-manifest.csv"
    pd.read_csv(manifest).drop(columns=["label_fractions"]).to_csv(old, index=False)
    with pytest.raises(InputError, match="no label_fractions.*preprocess again.*--forcerun preprocess"):
        load_cases(old, fold["train"], DEFAULT_LABELS, soft_labels=True)


def test_ensemble_of_registered_fold_models(trained):
    """MLflow loads models as torch.export programs, which refuse train() and
    eval(): an ensemble of registry members must still load and average."""
    from medseg.inference.model import ProbabilityEnsemble, load_model

    single = load_model("models:/medseg-unit@fold0", trained["uri"])
    both = load_model(["models:/medseg-unit@fold0", "models:/medseg-unit/1"], trained["uri"])
    assert isinstance(both.module, ProbabilityEnsemble) and both.labels == single.labels
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(both.module(x), single.module(x))
