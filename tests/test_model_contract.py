"""The model's contract travels with its weights, and folds' models average
into an ensemble."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medseg.inference.model import ProbabilityEnsemble, ensemble, load_model


def _checkpoint(model_and_scans):
    return torch.load(model_and_scans[0], map_location="cpu", weights_only=False)


def test_checkpoint_moved_away_from_its_model_json_keeps_its_normalisation(model_and_scans, tmp_path):
    """Bug report: a best.pt moved away from its model.json was silently
    normalised with the default percentiles (0.5 / 99.5). The checkpoint
    now carries its intensity window, labels and size."""
    state = _checkpoint(model_and_scans)
    assert state["intensity"] == {"lower_percentile": 0.5, "upper_percentile": 99.5}
    assert state["labels"] == ["heart", "lungs", "clavicles"] and state["size"] == 64
    state["intensity"] = {"lower_percentile": 2.0, "upper_percentile": 98.0}  # a model trained with another window
    alone = tmp_path / "elsewhere" / "best.pt"
    alone.parent.mkdir()
    torch.save(state, alone)
    loaded = load_model(str(alone))
    assert loaded.intensity == {"lower_percentile": 2.0, "upper_percentile": 98.0}
    assert loaded.labels == ["heart", "lungs", "clavicles"] and loaded.size == 64


def test_old_checkpoint_without_contract_needs_its_model_json(model_and_scans, tmp_path):
    state = _checkpoint(model_and_scans)
    del state["intensity"]  # as written before checkpoints carried it
    old = tmp_path / "best.pt"
    torch.save(state, old)
    with pytest.raises(ValueError, match=r"best\.pt: this checkpoint does not record its intensity"):
        load_model(str(old))
    (tmp_path / "model.json").write_text(json.dumps({"intensity": {"lower_percentile": 1.0,
                                                                   "upper_percentile": 99.0}}))
    assert load_model(str(old)).intensity == {"lower_percentile": 1.0, "upper_percentile": 99.0}


def test_ensemble_averages_the_members_probabilities(model_and_scans, tmp_path):
    first = model_and_scans[0]
    state = _checkpoint(model_and_scans)
    # A second member: the same network with its output bias shifted, so the
    # two give different probabilities.
    last_bias = [k for k in state["model"] if k.endswith("bias")][-1]
    state["model"][last_bias] = state["model"][last_bias] + 1.5
    second = tmp_path / "other.pt"
    torch.save(state, second)
    a, b = load_model(str(first)), load_model(str(second))
    both = load_model([str(first), str(second)])
    assert isinstance(both.module, ProbabilityEnsemble) and len(both.module.members) == 2
    assert both.labels == a.labels and both.size == a.size and both.intensity == a.intensity
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pa, pb, pe = a.module(x), b.module(x), both.module(x)
    assert (pa - pb).abs().max() > 0.05  # the members differ ...
    torch.testing.assert_close(pe, (pa + pb) / 2)  # ... and the ensemble is their mean
    assert both.fingerprint() not in (a.fingerprint(), b.fingerprint())


def test_ensemble_refuses_models_that_see_different_inputs(model_and_scans, tmp_path):
    state = _checkpoint(model_and_scans)
    state["intensity"] = {"lower_percentile": 2.0, "upper_percentile": 98.0}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ValueError, match="intensity differ"):
        load_model([str(model_and_scans[0]), str(other)])
    state = _checkpoint(model_and_scans)
    state["labels"] = ["lungs", "heart", "clavicles"]  # same channels, other order
    torch.save(state, other)
    with pytest.raises(ValueError, match="labels differ"):
        ensemble([load_model(str(model_and_scans[0])), load_model(str(other))])


def test_cv_summary_with_ensemble_choice_averages_the_folds(model_and_scans, tmp_path):
    """models/summary.json written by cv-finish --choice ensemble, with folds
    trained offline (no registered models): the folds' best.pt, averaged."""
    models = tmp_path / "models"
    for fold in (0, 1):
        (models / f"fold{fold}").mkdir(parents=True)
        shutil.copy(model_and_scans[0], models / f"fold{fold}" / "best.pt")
    summary = {"best_fold": 1, "model_uri": None, "choice": "ensemble", "folds": [0, 1],
               "fold_model_uris": [None, None]}
    (models / "summary.json").write_text(json.dumps(summary))
    loaded = load_model(str(models / "summary.json"))
    assert isinstance(loaded.module, ProbabilityEnsemble) and len(loaded.module.members) == 2
    assert "ensemble of folds 0, 1" in loaded.uri
    summary["choice"] = "best_fold"
    (models / "summary.json").write_text(json.dumps(summary))
    single = load_model(str(models / "summary.json"))
    assert not isinstance(single.module, ProbabilityEnsemble) and single.uri.endswith("fold1/best.pt")
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():  # identical members: the ensemble equals one of them
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(),
                                   single.module(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_model_thresholds_and_qc_threshold_come_from_the_checkpoint(model_and_scans, tmp_path):
    """A model's operating point (per-label thresholds, QC confidence
    threshold, chosen on cross-validation) travels in its checkpoint and is
    what prediction uses unless --threshold overrides it."""
    import pandas as pd

    from medseg.ingest.inputs import collect_inputs
    from medseg.inference.predict import PredictSettings, predict_files

    checkpoint, scans = model_and_scans
    state = _checkpoint(model_and_scans)
    state["thresholds"] = {"heart": 0.95}
    state["qc"] = {"min_confidence": 0.999}  # stricter than any real prediction reaches
    strict = tmp_path / "strict.pt"
    torch.save(state, strict)
    files = collect_inputs([scans]).files[:2]

    def run(model_path, name, **settings) -> pd.DataFrame:
        model = load_model(str(model_path))
        table, failures = predict_files(files, model, PredictSettings(write_seg=False, **settings), tmp_path / name)
        assert not failures
        return table.set_index("case_id")

    state = _checkpoint(model_and_scans)
    state["qc"] = {"min_confidence": 0.5}  # the confidence is never below 0.5: never flags
    lenient = tmp_path / "lenient.pt"
    torch.save(state, lenient)
    plain, tuned = run(lenient, "plain"), run(strict, "tuned")
    # Heart masks shrink at 0.95; the other labels keep 0.5 and do not change.
    assert (tuned["area_mm2_heart"] < plain["area_mm2_heart"]).all()
    pd.testing.assert_series_equal(tuned["area_mm2_lungs"], plain["area_mm2_lungs"])
    assert tuned["qc_flags"].str.contains("low_confidence").all()
    assert not plain["qc_flags"].str.contains("low_confidence").any()
    assert plain["boundary_confidence"].between(0.5, 1.0).all()  # recorded for every scan
    recorded = json.loads((tmp_path / "tuned" / files[0].case_id / "prediction.json").read_text())
    assert recorded["settings"]["threshold"] == {"heart": 0.95, "lungs": 0.5, "clavicles": 0.5}
    overridden = run(strict, "overridden", threshold=0.5)  # --threshold 0.5: every label at 0.5
    pd.testing.assert_series_equal(overridden["area_mm2_heart"], plain["area_mm2_heart"])


def test_model_carries_its_training_precision(model_and_scans, tmp_path):
    """Prediction on CUDA autocasts as the model was trained (issue 14): the
    checkpoint's ``amp`` reaches the loaded model; an ensemble of models
    trained at different precisions runs in full precision."""
    state = _checkpoint(model_and_scans)
    paths = {}
    for amp in ("off", "bf16"):
        state["settings"] = {**state["settings"], "amp": amp}
        paths[amp] = tmp_path / f"{amp}.pt"
        torch.save(state, paths[amp])
    assert load_model(str(paths["off"])).amp == "off"
    assert load_model(str(paths["bf16"])).amp == "bf16"
    assert load_model([str(paths["bf16"]), str(paths["bf16"])]).amp == "bf16"
    assert load_model([str(paths["off"]), str(paths["bf16"])]).amp == "off"
