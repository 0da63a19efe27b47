"""The workflow on a real (single-node, localhost) SLURM cluster, through the
shipped profile workflow/profiles/slurm, against the same workflow run locally,
with every training job requeued once mid-way by SLURM (as preemption does) and resumed.

The cluster (munged, slurmctld, slurmd from Debian's packages) is started by
tests/slurm_cluster.py and stopped afterwards. The only mock is the GPU: the
node advertises two, which the profile's train and predict jobs are given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from services import require_programs, skip_or_fail
from slurm_cluster import PROGRAMS, LocalSlurmCluster
from workflow_runs import TEST_CONFIG, copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

# Rules that run as SLURM jobs (the others are localrules) for TEST_CONFIG:
# two folds (parallel train jobs), each fold's held-out scans in two chunks.
CLUSTER_JOBS = {"phantoms": 1, "preprocess": 1, "splits": 1, "preview": 1, "train": 2, "predict_chunk": 4,
                "evaluate": 2}
GPU_RULES = {"train", "predict_chunk"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        skip_or_fail("a test SLURM cluster needs root (slurmd starts jobs as their user)")
    programs = require_programs(*PROGRAMS)
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = LocalSlurmCluster(root, programs)
    try:
        cluster.start()
    except RuntimeError as err:
        cluster.stop()
        pytest.fail(str(err))
    yield cluster
    cluster.stop()
    leftover = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"cluster processes left running: {leftover}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jobs(cluster: LocalSlurmCluster) -> list[dict[str, str]]:
    """Every job slurmctld still holds (MinJobAge is long), as key=value fields."""
    proc = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True,
                          env=cluster.env, check=True)
    jobs = []
    for line in proc.stdout.splitlines():
        if line.strip() and not line.startswith("No jobs"):
            jobs.append(dict(re.findall(r"(\S+?)=(\S*)", line)))
    return jobs


class _Requeuer(threading.Thread):
    """Requeues (`scontrol requeue`) each train job once, while it runs and
    after its log shows epoch 1, as SLURM's preemption with requeue does.

    SLURM holds a requeued job back (Reason=BeginTime, about two minutes);
    the test then releases it (`scontrol update StartTime=now`), as an
    administrator may, so the test does not wait."""

    def __init__(self, cluster: LocalSlurmCluster, logs: Path) -> None:
        super().__init__(daemon=True)
        self.cluster, self.logs = cluster, logs
        self.requeued: set[str] = set()
        self.released: set[str] = set()
        self.errors: list[str] = []
        self._done = threading.Event()

    def _scontrol(self, *args: str) -> bool:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.cluster.env)
        if proc.returncode != 0:
            self.errors.append(f"scontrol {' '.join(args)}: {proc.stderr.strip()}")
        return proc.returncode == 0

    def run(self) -> None:
        while not self._done.wait(0.2):
            try:
                jobs = _jobs(self.cluster)
            except subprocess.CalledProcessError as err:
                self.errors.append(str(err))
                continue
            for job in jobs:
                job_id = job["JobId"]
                if job_id in self.requeued - self.released and job.get("JobState") == "PENDING":
                    if self._scontrol("update", f"JobId={job_id}", "StartTime=now"):
                        self.released.add(job_id)
                comment = job.get("Comment", "")
                if not comment.startswith("rule_train_") or job["JobId"] in self.requeued:
                    continue
                log = self.logs / f"train_fold{comment.rsplit('_', 1)[-1]}.log"
                if job.get("JobState") == "RUNNING" and log.exists() and "epoch 1/" in log.read_text():
                    if self._scontrol("requeue", job_id):
                        self.requeued.add(job_id)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def test_workflow_through_slurm_matches_local_run(cluster, local_workflow_run, tmp_path):
    local = local_workflow_run
    on_slurm = copy_workflow(tmp_path / "slurm")
    env = {k: v for k, v in cluster.env.items() if not k.startswith("MLFLOW_")}
    # Each running train job is requeued by SLURM (`scontrol requeue`, as
    # preemption does) once its first epoch is logged: the same job must
    # start again and resume from last.pt.
    requeuer = _Requeuer(cluster, on_slurm / "results" / "e2e" / "logs")
    requeuer.start()
    started = time.monotonic()
    try:
        proc = run_snakemake(on_slurm, "--config", *TEST_CONFIG,
                             # No accounting database here: job states come from squeue.
                             "--slurm-status-command", "squeue", "--slurm-no-account",
                             "--slurm-init-seconds-before-status-checks", "2", profile="slurm", env=env)
    finally:
        requeuer.stop()
    out = proc.stdout + proc.stderr
    print(f"\nSLURM run: {time.monotonic() - started:.0f} s")

    # The jobs really went through SLURM: Snakemake names their SLURM job IDs,
    # slurmctld knows every one of them as COMPLETED, and the GPU rules got a GPU.
    submitted = set(re.findall(r"SLURM jobid (\d+)", out))
    jobs = {job["JobId"]: job for job in _jobs(cluster)}
    assert submitted and submitted <= set(jobs), (submitted, sorted(jobs))
    ours = [jobs[i] for i in sorted(submitted, key=int)]
    rules = [job["Comment"].split("_wildcards_")[0].removeprefix("rule_") for job in ours]
    states = {}
    for job, rule in zip(ours, rules):
        states.setdefault(rule, []).append(job["JobState"])
        gres = job.get("TresPerNode", "") + job.get("TresPerJob", "")
        assert ("gpu" in gres) == (rule in GPU_RULES), (rule, job)
    expected = {rule: ["COMPLETED"] * n for rule, n in CLUSTER_JOBS.items()}
    assert {rule: sorted(s, reverse=True) for rule, s in states.items()} == expected
    # Each train job was requeued while running and ended COMPLETED under the
    # same job ID, restarted once by SLURM (not resubmitted by Snakemake).
    train_ids = {job["JobId"] for job, rule in zip(ours, rules) if rule == "train"}
    assert requeuer.errors == [] and requeuer.requeued == train_ids, (requeuer.requeued, train_ids, requeuer.errors)
    assert {jobs[i]["Restarts"] for i in train_ids} == {"1"}, [jobs[i] for i in train_ids]
    completed = {job["JobId"] for job in cluster.completed_jobs() if job.get("JobState") == "COMPLETED"}
    assert {job["JobId"] for job in ours if job["JobState"] == "COMPLETED"} <= completed
    # The two folds trained at the same time, as separate jobs.
    trains = {fold: [j for j, r in zip(ours, rules) if r == "train" and j["Comment"].endswith(f"_{fold}")]
              for fold in (0, 1)}
    assert any(a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"]
               for a in trains[0] for b in trains[1]), "no train jobs of the two folds ran at the same time"

    # The outputs are those of the local run.
    a, b = local / "results" / "e2e", on_slurm / "results" / "e2e"
    assert (a / "splits.json").read_text() == (b / "splits.json").read_text()
    manifest_a = pd.read_csv(a / "preprocessed" / "manifest.csv")
    manifest_b = pd.read_csv(b / "preprocessed" / "manifest.csv")
    for manifest, workdir in ((manifest_a, local), (manifest_b, on_slurm)):  # absolute source paths
        for column in ("source", "mask_source"):
            manifest[column] = manifest[column].str.replace(str(workdir), "<workdir>", regex=False)
    pd.testing.assert_frame_equal(manifest_a, manifest_b)
    for row in manifest_a.itertuples():
        assert _sha(a / "preprocessed" / row.image) == _sha(b / "preprocessed" / row.image)
    splits = json.loads((a / "splits.json").read_text())
    for fold in (0, 1):
        metrics_a = pd.read_csv(a / "models" / f"fold{fold}" / "metrics.csv")
        metrics_b = pd.read_csv(b / "models" / f"fold{fold}" / "metrics.csv")
        numeric = [c for c in metrics_a.columns if "dice" in c or "loss" in c]
        np.testing.assert_allclose(metrics_a[numeric], metrics_b[numeric], rtol=1e-4, atol=1e-5)
        table_a = pd.read_csv(a / "predictions" / f"fold{fold}" / "results.csv")
        table_b = pd.read_csv(b / "predictions" / f"fold{fold}" / "results.csv")
        assert sorted(table_a.case_id) == sorted(table_b.case_id) == sorted(splits["folds"][fold]["test"])
        for case in table_a.case_id:
            for mask in sorted((a / "predictions" / f"fold{fold}" / case / "masks").glob("*.png")):
                other = b / "predictions" / f"fold{fold}" / case / "masks" / mask.name
                x, y = np.asarray(Image.open(mask)) > 0, np.asarray(Image.open(other)) > 0
                assert (x == y).mean() > 0.999, (fold, case, mask.name)
        summary_a = pd.read_csv(a / "evaluation" / f"fold{fold}" / "summary.csv", index_col=0)
        summary_b = pd.read_csv(b / "evaluation" / f"fold{fold}" / "summary.csv", index_col=0)
        np.testing.assert_allclose(summary_a["dice_mean"], summary_b["dice_mean"], atol=1e-3)
    for fold in (0, 1):  # the requeued job resumed, it did not start again
        log = (b / "logs" / f"train_fold{fold}.log").read_text()
        assert "resuming from" in log and "epoch 1/2" not in log, log[-3000:]
    # Each job left its log in the usual place.
    for rule in ("preprocess", "train_fold1", "predict_fold1_chunk1", "evaluate_fold1"):
        assert (b / "logs" / f"{rule}.log").stat().st_size > 0
