"""The training loop: epochs, validation, checkpoints, resume, tracking.

Checkpoints (in the run's output folder):
- ``last.pt`` after every epoch: model, optimiser, scheduler, AMP scaler,
  epoch, history, MLflow run ID. A killed or preempted job restarted with the
  same settings continues from it, in the same MLflow run, and ends with the
  result an uninterrupted run would have had (epochs are seeded by their
  number alone).
- ``best.pt``: weights with the best mean validation Dice so far.

An epoch reaches the tracker only after its checkpoint is written, so a job
killed at any moment never logs an epoch twice once resumed; the epochs it
checkpointed but did not log are sent on resume (:meth:`Trainer.log_epochs`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.metrics import DiceMetric, MeanIoU
from monai.utils import set_determinism

from medseg.atomic import atomic_path, write_text_atomic
from medseg.errors import DeviceUnavailable, SettingsMismatch
from medseg.preprocessing.intensity import DEFAULT_INTENSITY
from medseg.training.data import AugmentedCases, CaseTensors, augmentation, epoch_seed
from medseg.training.loss import MultiLabelDiceCELoss, label_weight_tensor
from medseg.training.network import NetworkSpec, build_network, check_input_size
from medseg.training.settings import AMP_MODES, TrainSettings
from medseg.visualise import legend_text, overlay_rgb, save_contact_sheet, save_figure, subplots

log = logging.getLogger(__name__)

# Fault injection for the resume tests: SIGKILL this process right after the
# checkpoint of the given epoch is written (as a preempted cluster job would die).
KILL_AFTER_EPOCH_ENV = "MEDSEG_TEST_KILL_AFTER_EPOCH"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, which is what a SLURM
    job (or taskset) was given, not the whole node's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Device:
    """Where and how the network runs."""

    torch_device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision

    @property
    def name(self) -> str:
        if self.torch_device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.torch_device)}"
        return f"cpu:{torch.get_num_threads()}threads"


def pick_device(setting: str, amp: str) -> Device:
    """CUDA when asked or available (mixed precision per ``amp``), else CPU
    with all cores and no AMP.

    Raises:
        DeviceUnavailable: ``setting`` is "cuda" but CUDA is not available.
    """
    use_cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' requested but torch.cuda.is_available() is False")
    if not use_cuda:
        torch.set_num_threads(usable_cpus())
        return Device(torch.device("cpu"), None)
    torch.backends.cudnn.benchmark = False
    return Device(torch.device("cuda"), cuda_amp_dtype(amp, torch.cuda.is_bf16_supported()))


def cuda_amp_dtype(amp: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on CUDA ("auto": bfloat16
    where the GPU supports it, else float16; "bf16", "fp16"; "off": None,
    full precision).

    Raises:
        ValueError: an unknown setting.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r}; choose from {', '.join(AMP_MODES)}")
    if amp == "bf16" or (amp == "auto" and bf16_supported):
        return torch.bfloat16
    if amp in ("fp16", "auto"):
        return torch.float16
    return None


def build_optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum, nesterov=True,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def build_scheduler(settings: TrainSettings, optimizer: torch.optim.Optimizer):
    """Stepped once per epoch."""
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    if settings.scheduler == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=settings.epochs, power=0.9)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_mean_dice: float
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _write_history_csv(path: Path, history: Sequence[dict]) -> None:
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buffer.getvalue())


def training_curves_figure(history: Sequence[dict], labels: Sequence[str]):
    """The figure of :func:`save_training_curves`, not saved (tests inspect it).

    Args:
        history: one dict per epoch with "epoch" (int), "train_loss" and,
            when validated, "val_loss" and "val_dice_<label>" /
            "val_dice_mean" (floats; Dice in [0, 1]).
        labels: label names, in channel order.

    Returns:
        A matplotlib Figure with two Axes: loss (left), validation Dice
        (right). Lines carry the project's label colours
        (:func:`medseg.visualise.label_colour`), the mean is black; epochs
        are whole-number ticks.
    """
    from matplotlib.ticker import MaxNLocator

    from medseg.visualise import label_colour

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_dice) = subplots(1, 2, figsize=(10, 4.4))
    # Loss lines in neutral tones and told apart by style, so no loss line
    # wears a label's colour.
    ax_loss.plot(epochs, [h["train_loss"] for h in history], color="0.45", marker="o", markersize=3,
                 label="training loss")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), color="black", linestyle="--", marker="s", markersize=3, label="validation loss")
    ax_loss.set_title("Loss (Dice + BCE; lower is better)", fontsize=10)
    ax_loss.set_ylabel("Dice + BCE loss")
    for index, name in enumerate([*labels, "mean"]):
        points = [(h["epoch"], h[f"val_dice_{name}"]) for h in history if h.get(f"val_dice_{name}") is not None]
        if not points:
            continue
        if name == "mean":
            style = {"color": "black", "linewidth": 2, "linestyle": "--", "label": "mean of labels"}
        else:
            style = {"color": label_colour(name, index), "linewidth": 1.5, "label": name}
        ax_dice.plot(*zip(*points), marker="o", markersize=3, **style)
    ax_dice.set_title("Validation Dice per label (higher is better)", fontsize=10)
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    for ax in (ax_loss, ax_dice):
        ax.set_xlabel("epoch")
        # Epochs are whole numbers: no ticks at 2.5, 7.5, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_lines():
            ax.legend(fontsize=8)
    last = max(epochs) if epochs else 0
    fig.suptitle(f"Training curves, {last} epoch{'s' if last != 1 else ''}")
    return fig


def save_training_curves(path: Path, history: Sequence[dict], labels: Sequence[str]) -> None:
    """Loss and validation Dice per epoch as one PNG, written atomically
    (figure: :func:`training_curves_figure`)."""
    save_figure(training_curves_figure(history, labels), path)


class Trainer:
    """Trains one network on one fold.

    Args:
        settings: training settings.
        labels: label names, one output channel each.
        train_cases, val_cases: data in memory (see :func:`load_cases`).
        out_dir: where checkpoints, metrics.csv and pictures go.
        tracker: a :class:`medseg.tracking.RunLogger` or None.
        on_epoch: called with each epoch's metrics (e.g. progress display).
        data_fingerprint: identifies the data and split; a checkpoint made
            on other data is never resumed.
        intensity: the preprocessing's {"lower_percentile", "upper_percentile"}
            (default 0.5 / 99.5): stored in every checkpoint, so that a
            checkpoint alone tells prediction how to normalise.
        dataset_fingerprint: the manifest's fingerprint, stored likewise.
    """

    def __init__(self, settings: TrainSettings, labels: Sequence[str], train_cases: CaseTensors,
                 val_cases: CaseTensors, out_dir: str | Path, tracker=None,
                 on_epoch: Callable[[dict], None] | None = None, data_fingerprint: str = "",
                 intensity: Mapping[str, float] | None = None, dataset_fingerprint: str = "") -> None:
        if not train_cases.case_ids:
            raise ValueError("no training cases")
        self.settings = settings
        self.labels = list(labels)
        self.train_cases = train_cases
        self.val_cases = val_cases
        self.out_dir = Path(out_dir)
        self.tracker = tracker
        self.on_epoch = on_epoch
        self.data_fingerprint = data_fingerprint
        self.intensity = dict(intensity or DEFAULT_INTENSITY)
        self.dataset_fingerprint = dataset_fingerprint
        self.device = pick_device(settings.device, settings.amp)
        self.size = int(train_cases.images.shape[-1])

        spec = NetworkSpec(settings.network, settings.preset, settings.upsample, in_channels=1,
                           out_channels=len(self.labels))
        check_input_size(spec, self.size)
        if settings.patch_size > self.size:
            raise SettingsMismatch(f"train.patch_size {settings.patch_size} is larger than the preprocessed "
                                   f"size {self.size}")
        if settings.patch_size:
            check_input_size(spec, settings.patch_size, "train.patch_size")  # what the network trains on
        set_determinism(seed=settings.seed)
        self.model = build_network(spec)
        self.model.to(self.device.torch_device)
        self.ema = None
        if settings.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                     use_buffers=True)
        weights = label_weight_tensor(self.labels, settings.label_weights)
        self.loss_fn = MultiLabelDiceCELoss(weights, settings.lambda_dice, settings.lambda_ce).to(self.device.torch_device)
        self.optimizer = build_optimizer(settings, self.model.parameters())
        self.scheduler = build_scheduler(settings, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.amp_dtype == torch.float16)
        self.transform = augmentation(settings.augment, self.size, settings.patch_size, settings.soft_labels)
        self.dataset = AugmentedCases(train_cases, self.transform, settings.samples_per_epoch)
        self.history: list[dict] = []
        self.best_mean_dice = -math.inf
        self.best_epoch = 0
        self.start_epoch = 1
        self.run_id: str | None = None

    # -- checkpoints -------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated, checkpointed as ``model`` and
        shipped: the moving average when ``ema_decay`` is set."""
        return self.model if self.ema is None else self.ema.module

    def _state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": self.eval_model.state_dict(),
            # The weights being optimised, when they are not "model" (EMA).
            **({} if self.ema is None else {"train_model": self.model.state_dict(),
                                            "ema_n_averaged": int(self.ema.n_averaged)}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best_mean_dice": self.best_mean_dice,
            "best_epoch": self.best_epoch,
            "mlflow_run_id": self.run_id,
            "settings": self.settings.to_dict(),
            "settings_fingerprint": self.settings.fingerprint(),
            "data_fingerprint": self.data_fingerprint,
            # The model's contract: what prediction needs besides the weights.
            "labels": self.labels,
            "size": self.size,
            "intensity": self.intensity,
            "dataset_fingerprint": self.dataset_fingerprint,
        }

    def try_resume(self) -> dict | None:
        """Load ``last.pt`` if it belongs to these settings; return it."""
        if not self.last_path.exists():
            return None
        state = torch.load(self.last_path, map_location=self.device.torch_device, weights_only=False)
        if (state.get("settings_fingerprint") != self.settings.fingerprint() or state.get("labels") != self.labels
                or state.get("data_fingerprint") != self.data_fingerprint):
            log.warning("%s was written with other settings or data; starting afresh", self.last_path)
            return None
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.fill_(state.get("ema_n_averaged", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.best_mean_dice = state["best_mean_dice"]
        self.best_epoch = state["best_epoch"]
        if not self.best_path.exists():  # lost with a cleaned-up job: the next validation rewrites it
            self.best_mean_dice, self.best_epoch = -math.inf, 0
        self.start_epoch = state["epoch"] + 1
        self.run_id = state.get("mlflow_run_id")
        log.info("resuming from %s at epoch %d", self.last_path, self.start_epoch)
        return state

    # -- one epoch ---------------------------------------------------------
    def _autocast(self):
        if self.device.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.device.amp_dtype)

    def _loader(self, epoch: int) -> DataLoader:
        seed = epoch_seed(self.settings.seed, epoch)
        if self.transform is not None:
            self.transform.set_random_state(seed=seed)
        workers = self.settings.num_workers
        if workers < 0:
            workers = 0 if self.device.torch_device.type == "cpu" else min(8, usable_cpus())
        return DataLoader(self.dataset, batch_size=self.settings.batch_size, shuffle=True, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed), drop_last=False,
                          pin_memory=self.device.torch_device.type == "cuda",
                          persistent_workers=False)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training cases; returns loss, seconds, images/s."""
        torch.manual_seed(epoch_seed(self.settings.seed, epoch))
        self.model.train()
        device = self.device.torch_device
        total, count, data_wait = 0.0, 0, 0.0
        start = time.perf_counter()
        fetch_start = time.perf_counter()
        for batch in self._loader(epoch):
            images = batch["image"].to(device, non_blocking=True)
            targets = batch["label"].to(device, non_blocking=True)
            data_wait += time.perf_counter() - fetch_start
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.loss_fn(self.model(images), targets)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total += float(loss.detach()) * images.shape[0]
            count += images.shape[0]
            fetch_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"train_loss": total / count, "epoch_seconds": seconds, "images_per_second": count / seconds,
                "data_wait_fraction": data_wait / seconds, "learning_rate": lr}

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits (N, C, S, S) for images (N, 1, S, S), on the CPU."""
        model = self.eval_model
        model.eval()
        outputs = []
        step = batch_size or self.settings.batch_size
        for i in range(0, len(images), step):
            with self._autocast():
                outputs.append(model(images[i:i + step].to(self.device.torch_device)).float().cpu())
        return torch.cat(outputs) if outputs else torch.empty(0)

    def validate(self) -> dict:
        """Validation loss, Dice and Jaccard per label (MONAI DiceMetric,
        MeanIoU) of the masks at probability 0.5, and their means over labels."""
        logits = self.predict_logits(self.val_cases.images)
        targets = self.val_cases.labels
        loss = float(self.loss_fn.cpu()(logits, targets))
        self.loss_fn.to(self.device.torch_device)
        masks = (torch.sigmoid(logits) > 0.5).float()
        result = {"val_loss": loss}
        for key, metric in (("dice", DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)),
                            ("jaccard", MeanIoU(include_background=True, reduction="mean_batch", ignore_empty=False))):
            metric(y_pred=masks, y=targets)
            per_label = metric.aggregate().tolist()
            for name, value in zip(self.labels, per_label):
                result[f"val_{key}_{name}"] = float(value)
            result[f"val_{key}_mean"] = float(np.mean(per_label))
        self._last_val_logits = logits
        return result

    def save_overlays(self, epoch: int, max_cases: int = 6, path: Path | None = None,
                      logits: torch.Tensor | None = None) -> Path:
        """Validation cases over their radiograph: ground truth (left) and
        prediction at 0.5 (right), titled with the case's mean Dice over labels.

        Args:
            epoch: named in the titles; also picks the default path.
            max_cases: at most this many validation cases (the first ones).
            path: PNG to write; default :meth:`overlay_path` of ``epoch``.
            logits: (N, C, S, S) of the validation cases; default the last
                :meth:`validate`'s, else computed now.

        Returns:
            The PNG written (a note instead of tiles when the fold has no
            validation cases).
        """
        path = path or self.overlay_path(epoch)
        n = min(max_cases, len(self.val_cases.case_ids))
        if logits is None:
            logits = getattr(self, "_last_val_logits", None)
        if logits is None and n:
            logits = self.predict_logits(self.val_cases.images[:n])
        tiles, titles = [], []
        if n:  # per case, as validate() scores the fold (MONAI; both empty counts 1)
            per_case = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
                y_pred=(torch.sigmoid(logits[:n]) > 0.5).float(), y=self.val_cases.labels[:n]).mean(dim=1)
        for i in range(n):
            image = self.val_cases.images[i, 0].numpy()
            truth = {name: self.val_cases.labels[i, c].numpy() > 0.5 for c, name in enumerate(self.labels)}
            pred = {name: torch.sigmoid(logits[i, c]).numpy() > 0.5 for c, name in enumerate(self.labels)}
            dice = float(per_case[i])
            tiles += [overlay_rgb(image, truth), overlay_rgb(image, pred)]
            titles += [f"{self.val_cases.case_ids[i]}: ground truth",
                       f"epoch {epoch} prediction (Dice {dice:.3f})"]
        if not tiles:  # a fold without validation cases still gets its picture
            tiles, titles = [np.full((8, 8), 0.5, dtype=np.float32)], ["no validation cases in this fold"]
        save_contact_sheet(path, tiles, titles, columns=4,
                           caption=f"{n} of {len(self.val_cases.case_ids)} validation cases; "
                                   + legend_text(self.labels))
        return path

    def overlay_path(self, epoch: int) -> Path:
        """Where :meth:`save_overlays` writes the picture of ``epoch``."""
        return self.out_dir / "overlays" / f"epoch{epoch:04d}.png"

    def log_epochs(self, epochs: Sequence[dict]) -> None:
        """Send these history rows (and their overlay pictures) to the tracker."""
        if self.tracker is None:
            return
        for metrics in epochs:
            epoch = metrics["epoch"]
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if self.overlay_path(epoch).exists():
                # An image series with a step: the UI shows a slider over epochs.
                self.tracker.log_image(self.overlay_path(epoch), key="val/overlays", step=epoch)

    # -- the loop ----------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` to ``settings.epochs``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = self.start_epoch - 1
        epochs = self.settings.epochs
        kill_after = int(os.environ.get(KILL_AFTER_EPOCH_ENV, "0") or 0)
        for epoch in range(self.start_epoch, epochs + 1):
            metrics = {"epoch": epoch, **self.train_epoch(epoch)}
            validate = bool(self.val_cases.case_ids) and (epoch % self.settings.validate_every == 0 or epoch == epochs)
            if validate:
                metrics.update(self.validate())
                if metrics["val_dice_mean"] > self.best_mean_dice:
                    self.best_mean_dice = metrics["val_dice_mean"]
                    self.best_epoch = epoch
                    _save_checkpoint(self.best_path, self._state(epoch))
            elif not self.val_cases.case_ids:
                self.best_epoch = epoch  # no validation data: best = latest
                _save_checkpoint(self.best_path, self._state(epoch))
            self.history.append(metrics)
            if validate and (epoch % self.settings.overlay_every == 0 or epoch == epochs):
                self.save_overlays(epoch)
            _write_history_csv(self.out_dir / "metrics.csv", self.history)
            _save_checkpoint(self.last_path, self._state(epoch))
            # Tracked only once the checkpoint holds the epoch: a job killed in
            # between reruns no epoch that MLflow already has (no step logged
            # twice); what MLflow missed is logged on resume (log_epochs).
            self.log_epochs([metrics])
            if self.on_epoch is not None:
                self.on_epoch({**metrics, "epochs": epochs})
            if kill_after and epoch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        save_training_curves(self.out_dir / "curves.png", self.history, self.labels)
        return TrainResult(self.out_dir, self.best_path, self.last_path, self.best_epoch, self.best_mean_dice,
                           self.history, resumed_from)


def format_progress(metrics: dict, labels: Sequence[str]) -> str:
    """One progress line: epoch, loss, Dice per label, images/s, ETA."""
    remaining = metrics["epochs"] - metrics["epoch"]
    parts = [f"epoch {metrics['epoch']}/{metrics['epochs']}", f"loss {metrics['train_loss']:.4f}"]
    if metrics.get("val_loss") is not None:
        parts.append(f"val loss {metrics['val_loss']:.4f}")
        dice = " ".join(f"{n} {metrics[f'val_dice_{n}']:.3f}" for n in labels)
        parts.append(f"Dice {dice} (mean {metrics['val_dice_mean']:.3f})")
    parts.append(f"{metrics['images_per_second']:.1f} img/s")
    parts.append(f"ETA {remaining * metrics['epoch_seconds']:.0f} s")
    return " | ".join(parts)
