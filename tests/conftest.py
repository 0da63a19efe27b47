"""Shared fixtures: repository paths and the optional shared data; under
MEDSEG_REQUIRE_ALL_TESTS=1 (CI), no test may skip (see requirements_switch.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from requirements_switch import REQUIRE_ALL_TESTS_ENV, all_tests_required, skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Safety net under the switch: a skip that did not go through
    skip_or_fail (pytest.skip, importorskip, a skipif mark) fails the test.
    Tests marked ``cuda`` may still skip (CI has no GPU); xfail is untouched."""
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and all_tests_required()
            and item.get_closest_marker("cuda") is None):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL_TESTS_ENV}=1 forbids skips: {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected."""
    report = yield
    if report.skipped and all_tests_required():
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL_TESTS_ENV}=1 forbids skips: {_skip_reason(report)}"
    return report


def pytest_configure(config):
    """ONNX exports of the models tests train go to a folder of this test
    run (shared by xdist's workers, which inherit the environment), not the
    user's cache; removed when the run ends."""
    if "MEDSEG_CACHE_DIR" not in os.environ and not hasattr(config, "workerinput"):
        import tempfile

        os.environ["MEDSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="medseg-test-cache-")
        config._medseg_cache_dir = os.environ["MEDSEG_CACHE_DIR"]


def pytest_unconfigure(config):
    folder = getattr(config, "_medseg_cache_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("MEDSEG_CACHE_DIR", None)


def shared_data_dir() -> Path:
    """../shared/data beside the project, or $MEDSEG_SHARED_DATA."""
    env = os.environ.get("MEDSEG_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def jsrt_root() -> Path:
    root = shared_data_dir() / "jsrt-scr-fold1"
    if not (root / "images").is_dir():
        skip_or_fail(f"JSRT/SCR data not present at {root}")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def local_workflow_run(tmp_path_factory) -> Path:
    """Working folder of one local run of the workflow on TEST_CONFIG, shared
    by the end-to-end test and the SLURM test (which compares against it)."""
    from workflow_runs import TEST_CONFIG, copy_workflow, run_snakemake

    workdir = copy_workflow(tmp_path_factory.mktemp("local-run"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    run_snakemake(workdir, "--config", *TEST_CONFIG, env=env)
    return workdir


@pytest.fixture(scope="session")
def workflow_report(local_workflow_run) -> Path:
    """``report.html`` of the local run (``snakemake --report``), made once for
    the end-to-end test and the report's own test."""
    from workflow_runs import TEST_CONFIG, run_snakemake

    run_snakemake(local_workflow_run, "--config", *TEST_CONFIG, "--report", "report.html")
    return local_workflow_run / "report.html"


def _train_model_and_scans(tmp: Path) -> None:
    from medseg.phantoms.write import write_phantom_dataset
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
    from medseg.structures import DEFAULT_LABELS
    from medseg.training.data import load_cases
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    write_phantom_dataset(tmp / "raw", n=16, seed=5, shape=(160, 128), pixel_spacing_mm=1.4)
    result = preprocess_dataset(DatasetSpec(tmp / "raw" / "images", tmp / "raw" / "masks"),
                                PreprocessSettings(size=64), tmp / "pre")
    ids = [r["case_id"] for r in result.rows]
    train = load_cases(result.manifest_path, ids[:12], DEFAULT_LABELS)
    val = load_cases(result.manifest_path, ids[12:], DEFAULT_LABELS)
    settings = TrainSettings(preset="cpu_tiny", epochs=20, samples_per_epoch=48, learning_rate=0.01)
    Trainer(settings, list(DEFAULT_LABELS), train, val, tmp / "model").fit()
    scans = tmp / "scans"
    scans.mkdir()
    for case in ids[12:]:  # unseen cases
        (scans / f"{case}.dcm").write_bytes((tmp / "raw" / "images" / f"{case}.dcm").read_bytes())


@pytest.fixture(scope="session")
def model_and_scans(tmp_path_factory):
    """A small phantom-trained checkpoint and non-square phantom DICOMs to predict.

    Session-scoped: the prediction tests (test_predict.py, test_plausibility.py,
    ...) share one trained model; under pytest-xdist the workers share it too
    (built by whichever needs it first, under a file lock: pytest-xdist's
    documented way to run a session fixture once). Tests must not modify it.
    Returns (best.pt path, folder of 4 DICOM scans).
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # not under pytest-xdist
        tmp = tmp_path_factory.mktemp("predict")
        _train_model_and_scans(tmp)
    else:
        from filelock import FileLock

        shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above the workers' own
        tmp = shared / "model-and-scans"
        with FileLock(str(shared / "model-and-scans.lock")):
            if not (tmp / "ready").exists():
                shutil.rmtree(tmp, ignore_errors=True)  # a worker that died half-way
                _train_model_and_scans(tmp)
                (tmp / "ready").touch()
    return tmp / "model" / "best.pt", tmp / "scans"


# Fixtures so costly that the tests using them stay on one xdist worker
# (`make test` runs `pytest -n 2 --dist loadgroup`): built once, not per worker.
_SHARED_RUN_FIXTURES = ("local_workflow_run", "workflow_report")


def pytest_collection_modifyitems(config, items):
    """Groups for ``--dist loadgroup``: the tests of the shared workflow run
    (end-to-end, dashboards, SLURM comparison) together, every other test
    with its module, whose module-scoped fixtures (a PostgreSQL stack, a
    SLURM cluster, a trained run) are then set up once."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in _SHARED_RUN_FIXTURES):
            group = "shared-workflow-run"
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _restore_mlflow_environment():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, which would
    leak into later tests' subprocesses (Snakemake, medseg train)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)
    try:
        import mlflow

        mlflow.set_tracking_uri(None)  # back to the defaults
        mlflow.set_registry_uri(None)
        for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in saved]:
            del os.environ[key]
    except ImportError:
        pass
