"""The demo workflow's MLflow store as a reviewer opens it in the MLflow UI.

Reads the store of the shared local workflow run (tests/conftest.py
``local_workflow_run``: two trained folds, their evaluations and the
cross-validation run) through ``MlflowClient`` only, as the UI does.
"""

from __future__ import annotations

import json

import pytest

from medseg.tracking import DESCRIPTION_TAG, client_for

SAME_TAGS = ("medseg.version", "git.commit", "dataset.fingerprint", "fold", "medseg.network", "medseg.upsample")


@pytest.fixture(scope="module")
def store(local_workflow_run):
    results = local_workflow_run / "results" / "e2e"
    client = client_for(f"sqlite:///{local_workflow_run / 'results' / 'mlflow.db'}")
    folds = [json.loads((results / "models" / f"fold{k}" / "model.json").read_text()) for k in (0, 1)]
    summary = json.loads((results / "models" / "summary.json").read_text())
    evaluations = [json.loads((results / "evaluation" / f"fold{k}" / "mlflow_run.json").read_text()) for k in (0, 1)]
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {"client": client, "folds": folds, "summary": summary, "evaluations": evaluations,
            "experiment": experiment, "runs": {r.info.run_id: r for r in runs}}


def test_every_run_is_described_and_no_parameter_reads_none(store):
    assert store["experiment"].tags.get(DESCRIPTION_TAG)
    assert len(store["runs"]) == 5  # cross-validation + 2 folds + 2 evaluations
    for run in store["runs"].values():
        assert run.data.tags.get(DESCRIPTION_TAG), run.info.run_name
        assert run.data.tags.get("medseg.role") in ("cross-validation", "training", "evaluation"), run.info.run_name
        nones = [k for k, v in run.data.params.items() if v == "None"]
        assert not nones, (run.info.run_name, nones)
        assert run.info.status == "FINISHED", run.info.run_name


def test_cross_validation_run_spans_its_folds_and_evaluations(store):
    parent = store["runs"][store["summary"]["parent_run_id"]]
    children = [r for r in store["runs"].values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["evaluation-fold0", "evaluation-fold1", "fold0", "fold1"]
    assert parent.info.start_time <= min(r.info.start_time for r in children)
    assert parent.info.end_time >= max(r.info.end_time for r in children)
    # The folds' means, under the folds' own metric names (one column in the runs table).
    metrics = parent.data.metrics
    best = [f["best_metrics"]["val_dice_lungs"] for f in store["folds"]]
    assert metrics["best/val_dice/lungs"] == pytest.approx(sum(best) / 2)
    tests = [store["runs"][e["run_id"]].data.metrics["test/dice/heart"] for e in store["evaluations"]]
    assert metrics["test/dice/heart"] == pytest.approx(sum(tests) / 2, abs=1e-4)  # summary.csv has 4 digits
    assert parent.data.tags["best_fold"] == str(store["summary"]["best_fold"])
    assert f"Folds trained: 0, 1; best fold {store['summary']['best_fold']}" in parent.data.tags[DESCRIPTION_TAG]


def test_training_runs_have_grouped_metrics_dataset_and_splits(store):
    client = store["client"]
    for fold in store["folds"]:
        run = store["runs"][fold["run_id"]]
        assert run.data.tags["medseg.role"] == "training"
        assert run.data.params["data.n_train_cases"] and run.data.params["data.n_val_cases"]
        names = set(run.data.metrics)
        assert {"train/loss", "val/loss", "val/dice/heart", "val/jaccard/clavicles", "perf/images_per_second",
                "best/epoch", "best/val_dice/mean"} <= names
        assert all("/" in name for name in names), names  # every metric in a chart group
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest == run.data.tags["dataset.fingerprint"][:32]
        assert dataset.dataset.name == "e2e"
        assert "splits.json" in {a.path for a in client.list_artifacts(fold["run_id"])}


def test_logged_models_carry_validation_and_test_figures_not_system_metrics(store):
    client = store["client"]
    best_fold = store["summary"]["best_fold"]
    for fold in store["folds"]:
        model = client.get_logged_model(fold["model_id"])
        assert model.name == f"fold{fold['fold']}" and model.source_run_id == fold["run_id"]
        metrics = {m.key: m.value for m in model.metrics}
        assert not [k for k in metrics if k.startswith("system/")], metrics
        assert metrics["best/val_dice/heart"] == pytest.approx(fold["best_metrics"]["val_dice_heart"])
        assert {"best/val_jaccard/lungs", "test/dice/lungs", "test/jaccard/clavicles", "test/hd95_mm/lungs"} <= set(
            metrics)
        # The cross-validation's choice is visible on the model page too.
        assert (model.tags.get("registry.alias") == "candidate") == (fold["fold"] == best_fold)
        version = client.get_model_version(fold["registered_model"], fold["model_version"])
        assert version.description and version.tags["fold"] == str(fold["fold"])
        assert float(version.tags["val_dice.heart"]) == pytest.approx(fold["best_metrics"]["val_dice_heart"],
                                                                      abs=1e-4)
        assert version.tags["dataset.fingerprint"] == store["runs"][fold["run_id"]].data.tags["dataset.fingerprint"]
    assert client.get_registered_model("medseg-e2e").description


def test_evaluation_runs_are_nested_linked_and_tagged_like_training(store):
    for fold, record in zip(store["folds"], store["evaluations"]):
        run = store["runs"][record["run_id"]]
        training = store["runs"][fold["run_id"]]
        assert run.info.run_name == f"evaluation-fold{fold['fold']}"
        assert run.data.tags["mlflow.parentRunId"] == store["summary"]["parent_run_id"]
        assert run.data.tags["medseg.role"] == "evaluation"
        for tag in SAME_TAGS:
            assert run.data.tags[tag] == training.data.tags[tag], tag
        assert run.data.tags.get("mlflow.source.name")  # where it came from, as for training runs
        # Linked through MLflow's own fields: the fold's model is the run's input.
        linked = store["client"].get_run(record["run_id"]).inputs.model_inputs  # (search_runs leaves them out)
        assert [m.model_id for m in linked] == [fold["model_id"]]
        assert run.data.tags["training_run_id"] == fold["run_id"] and run.data.tags["model_uri"] == fold["model_uri"]
        assert int(run.data.params["n_cases"]) == 4 and "n_missed.heart" in run.data.params
        (dataset,) = run.inputs.dataset_inputs
        assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["test"]
        assert all(name.startswith(("test/", "test_median/")) for name in run.data.metrics)


def test_saved_view_shows_the_folds_side_by_side(store):
    """The runs-table view cv-finish saves (MLflow UI's shared view) selects
    metric columns that the fold and evaluation runs have."""
    summary = store["summary"]
    experiment = store["experiment"]
    assert summary["runs_view"] == f"#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=medseg-folds"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    state = json.loads(experiment.tags["mlflow.sharedViewState.medseg-folds"])
    metrics = [c[len("metrics.`"):-1] for c in state["selectedColumns"] if c.startswith("metrics.")]
    assert {"best/val_dice/heart", "test/dice/heart", "test/jaccard/clavicles", "test/hd95_mm/lungs"} <= set(metrics)
    shown = [r for r in store["runs"].values() if "fold" in r.data.tags]  # the view's filter: tags.fold LIKE '%'
    assert len(shown) == 4
    for metric in metrics:
        assert any(metric in r.data.metrics for r in shown), metric


def test_flatten_leaves_out_unset_values():
    from medseg.tracking import flatten

    assert flatten({"data_root": None, "train": {"epochs": 3, "resume": None}, "label_values": {}}) == {
        "train.epochs": "3", "label_values": "{}"}


@pytest.mark.parametrize("key, name, best", [
    ("train_loss", "train/loss", "best/train_loss"),
    ("val_loss", "val/loss", "best/val_loss"),
    ("val_dice_heart", "val/dice/heart", "best/val_dice/heart"),
    ("val_jaccard_mean", "val/jaccard/mean", "best/val_jaccard/mean"),
    ("images_per_second", "perf/images_per_second", "best/images_per_second"),
    ("learning_rate", "train/learning_rate", "best/learning_rate"),
])
def test_metric_names_are_grouped(key, name, best):
    from medseg.tracking import best_metric_name, metric_name

    assert metric_name(key) == name
    assert best_metric_name(key) == best


def test_tolerant_retries_once_then_goes_on(caplog):
    """Shared records written by parallel jobs: a unique-key clash on the
    first try is followed by a second; a lasting failure is one warning."""
    from medseg.tracking import tolerant

    calls = []

    def clash_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("duplicate key value violates unique constraint")
        return "written"

    assert tolerant("describing", clash_once) == "written" and len(calls) == 2

    def always():
        raise RuntimeError("store gone")

    with caplog.at_level("WARNING", logger="medseg.tracking"):
        assert tolerant("describing", always) is None
    assert "describing failed (RuntimeError: store gone)" in caplog.text
