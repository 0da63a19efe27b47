"""Shared fixtures: repository paths and the optional shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the project, or $MEDSEG_SHARED_DATA."""
    env = os.environ.get("MEDSEG_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def jsrt_root() -> Path:
    root = shared_data_dir() / "jsrt-scr-fold1"
    if not (root / "images").is_dir():
        pytest.skip(f"JSRT/SCR data not present at {root}")
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
