"""The Snakemake workflow: config validation and real runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_patient_data import assert_workflow_run_holds_no_patient_data
from orthanc_server import orthanc  # noqa: F401 - fixture
from workflow_runs import SNAKEMAKE, TEST_CONFIG, copy_workflow, read_report, run_snakemake

@pytest.fixture
def workdir(tmp_path) -> Path:
    """A copy of the workflow's files, so runs do not touch the checkout."""
    return copy_workflow(tmp_path)


def test_dry_run_default_config(workdir):
    proc = run_snakemake(workdir, "-n")
    out = proc.stdout + proc.stderr
    for rule in ("phantoms", "preprocess", "splits", "preview", "resolved_config", "cv_start", "train", "cv_finish",
                 "test_cases", "predict_chunk", "gather_predictions", "evaluate"):
        assert rule in out


@pytest.mark.parametrize(
    "override, named",
    [
        ("preprocess={'sizee': 3}", "sizee"),  # misspelled key
        ("phantoms={'n': 'many'}", "'n'"),  # wrong type
        ("splits={'scheme': 'random'}", "scheme"),  # not an allowed value
        ("colour=red", "colour"),  # unknown top-level key
    ],
)
def test_schema_errors_name_the_key(workdir, override, named):
    proc = run_snakemake(workdir, "-n", "--config", override, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error validating config" in out
    assert named in out


@pytest.mark.parametrize("recipe", ["config/jsrt.yaml", "config/jsrt-cpu.yaml"])
def test_folder_source_needs_data_root(workdir, recipe):
    proc = run_snakemake(workdir, "-n", "--configfile", recipe, check=False)
    assert proc.returncode != 0 and "data_root" in proc.stdout + proc.stderr
    # With a data_root, the recipe over the defaults passes the schema as Snakemake layers them.
    from snakemake.utils import update_config, validate

    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((workdir / recipe).read_text()))
    config["data_root"] = "/data/jsrt"
    validate(config, str(workdir / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["train"]["network"] == "unet" and config["train"]["ema_decay"] > 0


def test_labels_must_use_known_structures(workdir):
    proc = run_snakemake(workdir, "-n", "--config", "labels={'lungs': ['left_lung', 'spleen']}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "labels.lungs" in out and "spleen" in out


@pytest.mark.parametrize("overrides, named", [
    # Only the network set: the default upsample (resize_bilinear) does not fit MONAI UNet.
    (["train={'network': 'unet'}"], "config key train: network 'unet' cannot use upsample 'resize_bilinear'"),
    (["train={'network': 'fcn8s', 'patch_size': 32}"],
     "network 'fcn8s' needs train.patch_size of at least 64, got 32"),
])
def test_network_that_cannot_run_is_refused_before_any_job(workdir, overrides, named):
    """Found by a fresh user: such configs passed the dry run and failed at the
    train job, after preprocessing, leaving a cross-validation run RUNNING."""
    proc = run_snakemake(workdir, "-n", "--config", *overrides, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and named in out, out[-2000:]
    assert not (workdir / "results").exists()


def test_end_to_end_on_phantoms(local_workflow_run, workflow_report):
    workdir = local_workflow_run
    results = workdir / "results" / "e2e"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    assert len(manifest) == 12
    assert set(manifest.original_rows) == {160} and set(manifest.original_cols) == {128}
    assert set(manifest.photometric) == {"MONOCHROME1 (inverted)", "MONOCHROME2"}
    assert len(pd.read_csv(results / "preprocessed" / "failures.csv")) == 0
    for row in manifest.itertuples():
        assert (results / "preprocessed" / row.image).is_file()
        assert (results / "preprocessed" / row.label).is_file()
    splits = json.loads((results / "splits.json").read_text())
    assert len(splits["folds"]) == 3
    assert sorted(c for f in splits["folds"] for c in f["test"]) == sorted(manifest.case_id)
    assert (results / "preprocessed" / "preview.png").stat().st_size > 10_000
    for rule in ("phantoms", "preprocess", "splits", "preview", "cv_start", "train_fold0", "cv_finish"):
        assert (results / "logs" / f"{rule}.log").is_file()
        assert (results / "benchmarks" / f"{rule}.tsv").is_file()
    # Training ran, tracked in the embedded MLflow store, nested under the CV run.
    folds = [json.loads((results / "models" / f"fold{k}" / "model.json").read_text()) for k in (0, 1)]
    summary = json.loads((results / "models" / "summary.json").read_text())
    assert summary["model_uri"] == "models:/medseg-e2e@candidate"
    best = max((0, 1), key=lambda k: folds[k]["best_metrics"]["val_dice_mean"])
    assert summary["best_fold"] == best
    from medseg.tracking import client_for

    client = client_for(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("medseg-e2e", "candidate").version) == folds[best]["model_version"]
    for k in (0, 1):
        assert "epoch 2/2" in (results / "logs" / f"train_fold{k}.log").read_text()
        assert client.get_run(folds[k]["run_id"]).data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    fold = folds[0]
    child = client.get_run(fold["run_id"])
    assert "best/val_dice/mean" in client.get_run(summary["parent_run_id"]).data.metrics
    # Prediction on the fold's held-out scans, at their original geometry, with DICOM SEG.
    test_cases = splits["folds"][0]["test"]
    predictions = pd.read_csv(results / "predictions" / "fold0" / "results.csv")
    assert sorted(predictions.case_id) == sorted(test_cases)
    assert set(predictions.rows) == {160} and set(predictions.cols) == {128}
    assert predictions.model_uri.str.startswith("models:/medseg-e2e/").all()
    for case in test_cases:
        assert (results / "predictions" / "fold0" / case / "seg.dcm").is_file()
    # ... predicted as two chunk jobs (config predict.chunks), gathered into one table.
    chunk_tables = [pd.read_csv(results / "predictions" / "fold0" / f"results.chunk-{i}-of-2.csv") for i in (0, 1)]
    assert all(len(t) > 0 for t in chunk_tables)
    assert sorted(pd.concat(chunk_tables).case_id) == sorted(test_cases)
    # Evaluation against the phantom masks, logged to MLflow linked to the training run.
    evaluation = pd.read_csv(results / "evaluation" / "fold0" / "cases.csv")
    assert sorted(set(evaluation.case_id)) == sorted(test_cases)
    assert set(evaluation.label) == {"heart", "lungs", "clavicles"}
    # Phantom cases are not JSRT/SCR data: no published figures beside them, one line says why.
    summary_txt = (results / "evaluation" / "fold0" / "summary.txt").read_text()
    assert "Frid-Adar" not in summary_txt and "No comparison with published results:" in summary_txt
    runs = client.search_runs([child.info.experiment_id], "tags.`medseg.role` = 'evaluation'")
    assert sorted(r.data.tags["training_run_id"] for r in runs) == sorted(f["run_id"] for f in folds)
    # The self-contained HTML report (its contents: test_report_items_and_main_page).
    assert workflow_report == workdir / "report.html" and workflow_report.stat().st_size > 50_000
    assert "preprocess 12/12" in (results / "logs" / "preprocess.log").read_text()
    # Phantom DICOMs carry fake patient fields; none may reach any output,
    # log, MLflow record or the report (DICOM SEGs carry their own patient's).
    assert_workflow_run_holds_no_patient_data(workdir)
    # A second run has nothing to do.
    again = run_snakemake(workdir, "-n", "--config", *TEST_CONFIG)
    assert "Nothing to be done" in again.stdout + again.stderr
    # A prediction setting reruns prediction and evaluation, never training.
    changed = run_snakemake(workdir, "-n", "--config", *TEST_CONFIG, "predict={'threshold': 0.6}")
    jobs = changed.stdout + changed.stderr
    assert "rule predict_chunk:" in jobs and "rule evaluate:" in jobs
    assert "rule train:" not in jobs and "rule cv_start:" not in jobs


def _text(html: str) -> str:
    """Visible text of an HTML fragment (tags dropped, entities decoded, spaces collapsed)."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def test_report_items_and_main_page(local_workflow_run, workflow_report):
    """What a researcher reviewing report.html sees: every item labelled with
    the same keys and captioned, the pictures and summaries of each step, and
    the MLflow run IDs with the command to open the UI on the main page."""
    workdir = local_workflow_run
    results = workdir / "results" / "e2e"
    report = read_report(workflow_report)
    items = report["results"]
    # One set of label keys for all (else the lists show empty cells or raw
    # paths), and a caption on every item.
    keys = {path: set(entry["labels"] or {}) for path, entry in items.items()}
    assert set(map(frozenset, keys.values())) == {frozenset({"item", "scope"})}, keys
    for path, entry in items.items():
        assert len(_text(entry["caption"])) > 40, (path, entry["caption"])
        assert "System Message" not in entry["caption"], (path, _text(entry["caption"]))  # no docutils error
    labelled = {(e["labels"]["item"], e["labels"]["scope"]): path for path, e in items.items()}
    expected = {("resolved config", "dataset e2e"), ("preprocessed cases", "dataset e2e"),
                ("ingest failures", "dataset e2e"), ("run IDs", "dataset e2e")}
    for k in (0, 1):
        expected |= {(item, f"fold {k}") for item in ("training curves", "validation overlays", "summary",
                                                      "summary table", "per-case metrics", "box plots",
                                                      "worst cases")}
        expected |= {(item, f"batch fold{k}") for item in ("results table", "CTR distribution", "overlays",
                                                           "failures")}
    assert set(labelled) == expected
    # Every item is in a category's list; pictures are shown, not just offered as downloads.
    listed = {p for subcategories in report["categories"].values() for paths in subcategories.values()
              for p in paths}
    assert listed == set(items)
    assert set(report["categories"]["Training"]) == {"fold 0", "fold 1"}
    for (item, scope), path in labelled.items():
        if path.endswith(".png"):
            assert items[path]["mime_type"] == "image/png", path
            assert re.match(r"data:image/png;.*base64,", items[path]["data_uri"]), path  # embedded
    # Captions carry the colour legend and say what is shown.
    for item in ("preprocessed cases", "training curves", "validation overlays", "box plots", "worst cases"):
        scope = "dataset e2e" if item == "preprocessed cases" else "fold 0"
        assert "heart red, lungs green, clavicles blue" in _text(items[labelled[(item, scope)]]["caption"]), item
    overlays = _text(items[labelled[("overlays", "batch fold0")]]["caption"])
    n = len(pd.read_csv(results / "predictions" / "fold0" / "results.csv"))
    assert f"overlays.png shows {min(n, 12)} of {n} scans" in overlays
    assert "thorax width magenta" in overlays
    assert "CTR above 0.5 in" in _text(items[labelled[("CTR distribution", "batch fold0")]]["caption"])
    # The evaluation summary is readable in the report, not only as a download.
    summary_txt = (results / "evaluation" / "fold0" / "summary.txt").read_text()
    first_line = next(line for line in summary_txt.splitlines() if line.strip())
    assert first_line.strip() in _text(items[labelled[("summary", "fold 0")]]["caption"])
    # The main page: the MLflow run IDs and how to open the UI.
    main = _text(report["workflow_desc"])
    assert "mlflow ui --backend-store-uri sqlite:///results/mlflow.db" in main and "http://127.0.0.1:5000" in main
    assert json.loads((results / "models" / "cv_run.json").read_text())["parent_run_id"] in main
    for k in (0, 1):
        model = json.loads((results / "models" / f"fold{k}" / "model.json").read_text())
        assert model["run_id"] in main and model["model_uri"] in main, k
    from medseg.tracking import client_for

    client = client_for(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(model["experiment"])
    evaluations = client.search_runs([experiment.experiment_id], "tags.`medseg.role` = 'evaluation'")
    assert len(evaluations) == 2 and all(run.info.run_id in main for run in evaluations)


def test_jsrt_config_on_real_fold(workdir, jsrt_root):
    # Preprocessing only (training on the real fold is benchmarks/jsrt.py's job).
    run_snakemake(workdir, "--configfile", "config/jsrt-cpu.yaml", "--config", f"data_root={jsrt_root}",
                  "preprocess={'size': 64}", "--", "results/jsrt-scr/splits.json", "results/jsrt-scr/preprocessed/preview.png")
    results = workdir / "results" / "jsrt-scr"
    manifest = pd.read_csv(results / "preprocessed" / "manifest.csv")
    n_images = len(list((jsrt_root / "images").glob("*.png")))
    assert len(manifest) == n_images == 124
    assert set(manifest.scr_fold.astype(int)) == {1}
    assert set(manifest.photometric) == {"white-is-zero (inverted)"}


def test_rerun_after_killed_training_resumes(workdir):
    """A train job killed mid-way (as a preempted cluster job) is resumed by
    the next snakemake run from its last.pt, in the same MLflow run."""
    config = ("dataset=resume", *TEST_CONFIG[1:4],
              "train={'preset': 'cpu_tiny', 'epochs': 3, 'samples_per_epoch': 8, 'batch_size': 4}")
    # Only as far as the trained fold: prediction, evaluation and report add nothing here.
    target = "results/resume/models/fold0/model.json"
    env = {**os.environ, "MEDSEG_TEST_KILL_AFTER_EPOCH": "1"}
    killed = subprocess.run([*SNAKEMAKE, "--profile", "workflow/profiles/default", "--cores", "2", "--config", *config,
                             "--", target], cwd=workdir, capture_output=True, text=True, env=env)
    assert killed.returncode == 1, killed.stderr[-3000:]
    fold_dir = workdir / "results" / "resume" / "models" / "fold0"
    assert (fold_dir / "last.pt").exists() and not (fold_dir / "model.json").exists()
    first_run = json.loads((fold_dir / "mlflow_run.json").read_text())["run_id"]
    rerun = run_snakemake(workdir, "--config", *config, "--", target)
    assert "rule train:" in rerun.stdout + rerun.stderr
    log = (workdir / "results" / "resume" / "logs" / "train_fold0.log").read_text()
    assert "resuming from" in log and "at epoch 2" in log
    assert "epoch 3/3" in log and "epoch 1/3" not in log
    summary = json.loads((fold_dir / "model.json").read_text())
    assert summary["best_epoch"] >= 1
    assert summary["run_id"] == first_run  # the same MLflow run, continued


def test_inference_batch_from_a_dicomweb_source_pushes_results(local_workflow_run, orthanc, tmp_path):
    """config inference.inputs names a DICOMweb series search (the whole of
    this test server's archive: whole_archive true) and push is source: the
    chunk jobs retrieve the scans from Orthanc and store each one's SEG and
    SR back on it."""
    workdir = local_workflow_run
    sources = sorted((workdir / "results" / "e2e" / "raw" / "images").glob("*.dcm"))[:2]
    orthanc.upload(sources)
    inference = (f"inference={{'inputs': ['{orthanc.dicomweb_url}/series'], 'name': 'dicomweb', "
                 "'push': 'source', 'whole_archive': True}")
    run_snakemake(workdir, "--config", *TEST_CONFIG, inference, "--",
                  "results/e2e/predictions/dicomweb/results.csv")
    batch = workdir / "results" / "e2e" / "predictions" / "dicomweb"
    table = pd.read_csv(batch / "results.csv")
    assert len(table) == 2 and table.dicom_seg.all() and table.dicom_sr.all()
    assert table.source.str.startswith(orthanc.dicomweb_url + "/studies/").all()
    modalities = [item["00080060"]["Value"][0] for item in orthanc.dicomweb_client().search_for_instances(
        fields=["Modality"])]
    assert sorted(modalities) == ["CR", "CR", "SEG", "SEG", "SR", "SR"]
    assert not (batch / "failures.csv").exists() or pd.read_csv(batch / "failures.csv").empty


def test_inference_batch_on_new_scans_in_chunks(local_workflow_run, tmp_path):
    """config inference: a folder of new scans (one of them broken) predicted
    with the cross-validation's model in predict.chunks jobs, then gathered."""
    workdir = local_workflow_run
    scans = tmp_path / "pacs-export"
    scans.mkdir()
    for source in sorted((workdir / "results" / "e2e" / "raw" / "images").glob("*.dcm"))[:3]:
        shutil.copy(source, scans / source.stem)  # PACS exports often have no extension
    (scans / "broken").write_bytes(b"DICM" + bytes(200))
    inference = f"inference={{'inputs': ['{scans}'], 'name': 'pacs'}}"
    proc = run_snakemake(workdir, "--config", *TEST_CONFIG, inference, "--", "results/e2e/predictions/pacs/results.csv")
    out = proc.stdout + proc.stderr
    for rule in ("train", "cv_finish", "preprocess"):  # the trained model is reused as it is
        assert f"rule {rule}:" not in out
    batch = workdir / "results" / "e2e" / "predictions" / "pacs"
    table = pd.read_csv(batch / "results.csv")
    assert sorted(table.case_id) == ["PHANTOM0001", "PHANTOM0002", "PHANTOM0003"]
    assert table.model_uri.str.startswith("models:/medseg-e2e").all()
    failures = pd.read_csv(batch / "failures.csv")
    assert len(failures) == 1 and failures.file[0].endswith("broken")
    assert sum(len(pd.read_csv(batch / f"results.chunk-{i}-of-2.csv")) for i in (0, 1)) == 3
    assert (batch / "ctr_distribution.png").stat().st_size > 5_000
    for case in table.case_id:
        assert (batch / case / "masks" / "heart.png").is_file() and (batch / case / "seg.dcm").is_file()
