"""Where training and prediction run: CPU or CUDA, and which mixed precision.

The first tests patch CUDA's presence (they run everywhere). Those marked
``cuda`` need a real GPU and skip without one, also in CI (the only tests
MEDSEG_REQUIRE_ALL_TESTS=1 lets skip): mixed-precision training, its resume
after a kill, and prediction on the GPU against the CPU's masks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import _config

from medseg.training.settings import AMP_MODES
from medseg.training.trainer import Device, pick_device, usable_cpus

MEDSEG = [sys.executable, "-m", "medseg"]
CPU = torch.device("cpu")
GPU = torch.device("cuda")
# The real GPU path's tests (also marked `cuda`): a CPU-only machine, CI's included, skips them.
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _restore_torch_globals(monkeypatch):
    """pick_device sets torch's threads (CPU) and cudnn.benchmark (CUDA)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'present', bf16 as the test says: call with bf16=True/False."""

    def install(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")

    return install


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- pick_device with CUDA patched ------------------------------------------------

@pytest.mark.parametrize("setting", ["auto", "cuda"])
@pytest.mark.parametrize("bf16, amp, dtype", [
    (True, "auto", torch.bfloat16),
    (False, "auto", torch.float16),  # no bf16: fp16 (with a GradScaler)
    (True, "bf16", torch.bfloat16),
    (False, "bf16", torch.bfloat16),  # asked for by name: as asked
    (True, "fp16", torch.float16),
    (False, "fp16", torch.float16),
    (True, "off", None),  # full precision
    (False, "off", None),
])
def test_cuda_device_and_mixed_precision(fake_cuda, setting, bf16, amp, dtype):
    fake_cuda(bf16=bf16)
    torch.backends.cudnn.benchmark = True
    device = pick_device(setting, amp)
    assert device == Device(GPU, dtype)
    assert device.name == "cuda:Fake GPU"
    assert torch.backends.cudnn.benchmark is False  # benchmark would make epochs irreproducible


def test_every_amp_mode_the_settings_accept_is_honoured(fake_cuda):
    """No accepted ``amp`` value silently means full precision, except "off"."""
    fake_cuda(bf16=True)
    chosen = {amp: pick_device("cuda", amp).amp_dtype for amp in AMP_MODES}
    assert chosen == {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@pytest.mark.parametrize("amp", AMP_MODES)
def test_cpu_when_asked_even_with_cuda_present_and_never_amp(fake_cuda, amp):
    fake_cuda(bf16=True)
    torch.set_num_threads(1)
    device = pick_device("cpu", amp)
    assert device == Device(CPU, None)
    assert torch.get_num_threads() == usable_cpus()  # all the CPUs this process was given
    assert device.name == f"cpu:{usable_cpus()}threads"


@pytest.mark.parametrize("amp", AMP_MODES)
def test_auto_without_cuda_is_cpu_without_amp(no_cuda, amp):
    assert pick_device("auto", amp) == Device(CPU, None)


@pytest.mark.parametrize("amp", AMP_MODES)
def test_cuda_asked_without_cuda_is_a_clear_error(no_cuda, amp):
    from medseg.errors import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match=r"^device 'cuda' requested but torch.cuda.is_available\(\) is False$"):
        pick_device("cuda", amp)


def test_predict_on_cuda_without_cuda_is_bad_usage(no_cuda, tmp_path, caplog):
    """`medseg predict --device cuda` on a machine without CUDA: exit 2 and
    one line saying why, no traceback, nothing written."""
    from medseg.cli import main

    (tmp_path / "scan.png").write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    code = main(["predict", str(tmp_path / "scan.png"), "--model", str(tmp_path / "best.pt"), "--out",
                 str(tmp_path / "out"), "--device", "cuda"])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "device 'cuda' requested but torch.cuda.is_available() is False"]
    assert not (tmp_path / "out").exists()


# --- the GradScaler: only for fp16 -------------------------------------------------

@pytest.mark.parametrize("dtype, scaled", [(torch.float16, True), (torch.bfloat16, False), (None, False)])
def test_grad_scaler_only_for_fp16(fake_cuda, monkeypatch, tmp_path, dtype, scaled):
    """bf16 has fp32's range (no loss scaling); fp16 underflows without it.
    The network stays on the CPU: pick_device is patched to keep it there."""
    from medseg.structures import DEFAULT_LABELS
    from medseg.training import trainer as trainer_module
    from medseg.training.data import CaseTensors
    from medseg.training.settings import TrainSettings

    fake_cuda()  # GradScaler("cuda") disables itself where CUDA is missing
    monkeypatch.setattr(trainer_module, "pick_device", lambda setting, amp: Device(CPU, dtype))
    labels = list(DEFAULT_LABELS)
    cases = CaseTensors(["a", "b"], torch.zeros(2, 1, 32, 32), torch.zeros(2, len(labels), 32, 32))
    trainer = trainer_module.Trainer(TrainSettings(preset="cpu_tiny", epochs=1), labels, cases, cases, tmp_path)
    assert trainer.scaler.is_enabled() is scaled


# --- prediction's device (medseg predict --device) ---------------------------------

def _predict_device(monkeypatch, tmp_path: Path, *args: str) -> torch.device:
    """The device `medseg predict` loads the model onto (stopped right there)."""
    import medseg.inference.model as model_module
    from medseg import cli

    seen: list[torch.device] = []

    def load_model(model, tracking_uri=None, device=None):
        seen.append(device)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(model_module, "load_model", load_model)
    scan = tmp_path / "scan.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(scan)
    (tmp_path / "best.pt").write_bytes(b"")
    code = cli.main(["predict", str(scan), "--model", str(tmp_path / "best.pt"), "--out", str(tmp_path / "out"),
                     *args])
    assert code == cli.EXIT_USAGE and len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("args, expected", [((), GPU), (("--device", "auto"), GPU), (("--device", "cuda"), GPU),
                                            (("--device", "cpu"), CPU)])
def test_predict_device_with_cuda(fake_cuda, monkeypatch, tmp_path, args, expected):
    fake_cuda()
    assert _predict_device(monkeypatch, tmp_path, *args) == expected


@pytest.mark.parametrize("args", [(), ("--device", "auto"), ("--device", "cpu")])
def test_predict_device_without_cuda(no_cuda, monkeypatch, tmp_path, args):
    assert _predict_device(monkeypatch, tmp_path, *args) == CPU


# --- on a real GPU ------------------------------------------------------------------

def _phantom_manifest(tmp: Path, n: int) -> tuple[Path, list[str]]:
    from medseg.phantoms.write import write_phantom_dataset
    from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset

    write_phantom_dataset(tmp / "raw", n=n, seed=3, shape=(128, 128))
    result = preprocess_dataset(DatasetSpec(images=tmp / "raw" / "images", masks_root=tmp / "raw" / "masks"),
                                PreprocessSettings(size=64), tmp / "pre")
    assert not result.failures
    return result.manifest_path, [r["case_id"] for r in result.rows]


@pytest.mark.cuda
@needs_gpu
def test_mixed_precision_training_on_cuda(tmp_path):
    """Two epochs with amp=auto (bf16 where the GPU has it, else fp16 with
    the GradScaler): finite losses, fp32 weights in the checkpoints."""
    from medseg.structures import DEFAULT_LABELS
    from medseg.training.data import load_cases
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    manifest, ids = _phantom_manifest(tmp_path, n=8)
    train = load_cases(manifest, ids[:6], DEFAULT_LABELS)
    val = load_cases(manifest, ids[6:], DEFAULT_LABELS)
    settings = TrainSettings(preset="cpu_tiny", device="cuda", amp="auto", epochs=2, samples_per_epoch=16,
                             batch_size=4, learning_rate=0.01)
    trainer = Trainer(settings, list(DEFAULT_LABELS), train, val, tmp_path / "model")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert trainer.device == Device(GPU, expected)
    assert trainer.device.name == f"cuda:{torch.cuda.get_device_name(GPU)}"
    assert trainer.scaler.is_enabled() is (expected == torch.float16)
    result = trainer.fit()

    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        for key in ("train_loss", "val_loss", "val_dice_mean"):
            assert math.isfinite(row[key]), (key, row)
    for path in (result.best_checkpoint, result.last_checkpoint):
        state = torch.load(path, map_location="cpu", weights_only=False)
        floats = {name: t for name, t in state["model"].items() if t.is_floating_point()}
        assert floats and all(t.dtype == torch.float32 for t in floats.values()), path
        assert all(torch.isfinite(t).all() for t in floats.values()), path


def _flat_weights(checkpoint: Path) -> tuple[int, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["epoch"], torch.cat([t.flatten().double() for t in state["model"].values() if t.is_floating_point()])


@pytest.mark.cuda
@needs_gpu
def test_cuda_training_resumed_after_kill_ends_like_an_uninterrupted_run(tmp_path, repo_root):
    """`medseg train` on the GPU (amp auto, the config's data-loading
    workers), SIGKILLed after epoch 1 and rerun, ends where a straight run
    does, and its MLflow run records the GPU.

    Tolerance: a GPU run is not bit-reproducible (the bilinear upsampling's
    backward pass adds with atomics, in any order; bf16/fp16 rounding can turn
    such a difference into a larger one), so the final weights are compared by
    the relative distance of all of them at once: resumed vs straight must be
    under a tenth of the distance one epoch of training moves them (epoch 1 vs
    2) and under 2 %. A resume that restarted, skipped or repeated an epoch,
    or lost the optimiser's state, misses that by far."""
    from medseg.preprocessing.splits import make_splits, write_splits
    from medseg.tracking import client_for

    manifest, ids = _phantom_manifest(tmp_path, n=10)
    splits = tmp_path / "splits.json"
    write_splits(splits, make_splits(ids, "kfold", k=4, seed=0, val_fraction=0.2))
    config = _config(repo_root, tmp_path, preset="cpu_tiny", epochs=2, samples_per_epoch=16, batch_size=4,
                     device="cuda", amp="auto")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def train(out: str, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*MEDSEG, "train", "--config", str(config), "--manifest", str(manifest), "--splits", str(splits),
             "--fold", "0", "--out", str(tmp_path / out), "--tracking-uri", uri],
            capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)

    straight = train("straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    killed = train("resumed", env={"MEDSEG_TEST_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -9, killed.stderr[-4000:]  # SIGKILL, like a preempted job
    partial_epoch, partial = _flat_weights(tmp_path / "resumed" / "last.pt")
    assert partial_epoch == 1
    resumed = train("resumed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr

    epoch, final = _flat_weights(tmp_path / "straight" / "last.pt")
    again_epoch, again = _flat_weights(tmp_path / "resumed" / "last.pt")
    assert epoch == again_epoch == 2
    resume_gap = float((again - final).norm() / final.norm())
    one_epoch = float((partial - final).norm() / final.norm())
    assert resume_gap < min(0.1 * one_epoch, 0.02), (resume_gap, one_epoch)

    state = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu", weights_only=False)
    reference = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu", weights_only=False)
    for a, b in zip(reference["history"], state["history"], strict=True):
        assert math.isfinite(b["train_loss"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)
        assert b["val_dice_mean"] == pytest.approx(a["val_dice_mean"], abs=0.02)
    tags = client_for(uri).get_run(state["mlflow_run_id"]).data.tags
    assert tags["device"] == f"cuda:{torch.cuda.get_device_name(0)}"


@pytest.mark.cuda
@needs_gpu
def test_predict_on_cuda_matches_cpu(model_and_scans, tmp_path):
    """`medseg predict --device cuda` (bf16 autocast) gives the CPU's masks
    but for a few pixels at the edges (> 99.5 % of all pixels equal)."""
    model, scans = model_and_scans
    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        proc = subprocess.run([*MEDSEG, "predict", str(scans), "--model", str(model), "--out", str(out),
                               "--device", device, "--no-seg"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"on {device}" in proc.stderr  # the log names the device used
        masks[device] = {path.relative_to(out): np.asarray(Image.open(path)) > 0
                         for path in sorted(out.glob("*/masks/*.png"))}
    assert masks["cpu"].keys() == masks["cuda"].keys() and len(masks["cpu"]) == 4 * 3
    equal = sum(int((masks["cpu"][k] == masks["cuda"][k]).sum()) for k in masks["cpu"])
    total = sum(m.size for m in masks["cpu"].values())
    assert equal / total > 0.995, equal / total


@pytest.mark.parametrize(("amp", "bf16", "expected"), [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float16), ("bf16", False, torch.bfloat16),
    ("fp16", True, torch.float16), ("off", True, None)])
def test_cuda_amp_dtype_follows_the_setting(amp, bf16, expected):
    """Training and prediction autocast by the same rule (issue 14: AMP
    honoured from the model's settings; "off" predicts in float32)."""
    from medseg.training.trainer import cuda_amp_dtype

    assert cuda_amp_dtype(amp, bf16) is expected


def test_cuda_amp_dtype_refuses_unknown_settings():
    from medseg.training.trainer import cuda_amp_dtype

    with pytest.raises(ValueError, match="unknown amp 'fp8'"):
        cuda_amp_dtype("fp8", True)


@pytest.mark.cuda
@needs_gpu
def test_cuda_prediction_autocasts_as_the_model_was_trained(model_and_scans):
    """A model trained in full precision (amp "off") predicts on CUDA in
    float32, the CPU's probabilities to 1e-4; one trained in bf16 predicts
    in bf16 (further from the CPU's)."""
    from medseg.inference.model import load_model
    from medseg.inference.predict import predict_probabilities

    model_path, _ = model_and_scans
    batch = np.random.default_rng(0).random((4, 1, 64, 64), dtype=np.float32)
    model = load_model(str(model_path))
    cpu = predict_probabilities(model, batch, False, torch.device("cpu"))
    differences = {}
    model.module.to("cuda")
    for amp in ("off", "bf16"):
        model.amp = amp
        differences[amp] = float(np.abs(predict_probabilities(model, batch, False, torch.device("cuda")) - cpu).max())
    assert differences["off"] < 1e-4 < differences["bf16"], differences
