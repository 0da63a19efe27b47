"""Training throughput: medseg's training loop vs a bare PyTorch loop.

Same network, same loss, same in-memory tensors, same process. Prints
images/s for both and the ratio (target >= 0.9 on CPU). On CUDA it also
prints GPU utilisation and the share of step time spent waiting for data.

    .venv/bin/python benchmarks/train_throughput.py [--size 256 --preset cpu_small --epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

from phantom_cases import phantom_cases

from medseg.structures import DEFAULT_LABELS
from medseg.training.data import AugmentSettings
from medseg.training.settings import TrainSettings
from medseg.training.trainer import Trainer


def bare_loop(trainer: Trainer, epochs: int) -> float:
    """Plain PyTorch: shuffled index batches straight from the tensors."""
    model, loss_fn, optimizer = trainer.model, trainer.loss_fn, trainer.optimizer
    device = trainer.device.torch_device
    images, labels = trainer.train_cases.images, trainer.train_cases.labels
    n, batch = len(images), trainer.settings.batch_size
    model.train()
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, batch):
            index = order[i:i + batch]
            x, y = images[index].to(device), labels[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            with trainer._autocast():
                loss = loss_fn(model(x), y)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
            seen += len(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def gpu_utilisation_sampler(samples: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            samples.append(float(torch.cuda.utilization()))
        except Exception:  # noqa: BLE001 - needs pynvml; report "n/a" without it
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="phantom cases")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    (cases,) = phantom_cases(args.n, args.size, (512, 448), seed=0)

    rows = []
    for augment in (False, True):
        settings = TrainSettings(preset=args.preset, batch_size=args.batch_size, epochs=args.epochs + 1,
                                 device=args.device, augment=AugmentSettings(enabled=augment))
        trainer = Trainer(settings, list(DEFAULT_LABELS), cases, cases, tempfile.mkdtemp())
        trainer.train_epoch(0)  # warm-up (allocator, kernels)
        bare = bare_loop(trainer, 1)
        samples: list[float] = []
        stop = threading.Event()
        sampler = None
        if trainer.device.torch_device.type == "cuda":
            sampler = threading.Thread(target=gpu_utilisation_sampler, args=(samples, stop), daemon=True)
            sampler.start()
        ours, waits = [], []
        for epoch in range(1, args.epochs + 1):
            metrics = trainer.train_epoch(epoch)
            ours.append(metrics["images_per_second"])
            waits.append(metrics["data_wait_fraction"])
        stop.set()
        bare = max(bare, bare_loop(trainer, args.epochs))
        medseg_rate = sum(ours) / len(ours)
        rows.append((augment, medseg_rate, bare, sum(waits) / len(waits),
                     sum(samples) / len(samples) if samples else None, trainer.device.name))

    print(f"{args.n} phantoms at {args.size}x{args.size}, preset {args.preset}, batch {args.batch_size}, "
          f"{args.epochs} timed epochs")
    for augment, ours, bare, wait, util, device in rows:
        what = "with augmentation   " if augment else "without augmentation"
        line = (f"{device}: medseg loop {what}: {ours:7.1f} img/s | bare PyTorch loop: {bare:7.1f} img/s | "
                f"ratio {ours / bare:.2f} | data wait {100 * wait:.1f}% of epoch")
        if util is not None:
            line += f" | GPU utilisation {util:.0f}%"
        print(line)


if __name__ == "__main__":
    main()
