"""Decoder upsampling inside BasicUNet, on phantoms: every choice BasicUNet takes.

Trains the same network with each upsampling on the same phantoms (same seed,
same epochs) and prints validation Dice, training speed, parameters and two
checkerboard scores (medseg.evaluation.checkerboard): the share of the
predicted probability maps' spectral energy at the Nyquist frequencies and the
period-2 peak ratio (period-2 patterns that transposed convolutions are known
to leave; Odena et al. 2016). The JSRT comparison of every network and
decoder is benchmarks/methods.py (docs/methods.md).

    .venv/bin/python benchmarks/upsampling.py [--size 128 --epochs 12 --preset cpu_tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from phantom_cases import phantom_cases

from medseg.evaluation.checkerboard import checkerboard_score, nyquist_share
from medseg.structures import DEFAULT_LABELS
from medseg.training.network import NETWORK_UPSAMPLING, count_parameters
from medseg.training.settings import TrainSettings
from medseg.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples-per-epoch", type=int, default=96)
    parser.add_argument("--preset", default="cpu_tiny")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds")
    args = parser.parse_args()

    # A seeded shuffle: ~60% training, the rest validation.
    order = np.random.default_rng(0).permutation(args.n)
    cut = int(0.6 * args.n)
    train, val = phantom_cases(args.n, args.size, (256, 224), seed=1, groups=[order[:cut], order[cut:]])

    print(f"{args.n} phantoms at {args.size}px, preset {args.preset}, {args.epochs} epochs x "
          f"{args.samples_per_epoch} samples, {len(val.case_ids)} validation cases, {args.seeds} seed(s)")
    print(f"{'upsampling':<16} {'params':>8} {'img/s':>7} {'Dice heart':>10} {'lungs':>6} {'clavicles':>9} "
          f"{'mean':>6} {'Nyquist share x1e-4':>19} {'peak ratio':>10}")
    for mode in NETWORK_UPSAMPLING["basic_unet"]:
        dice, rates, boards, peaks = [], [], [], []
        for seed in range(args.seeds):
            settings = TrainSettings(preset=args.preset, upsample=mode, epochs=args.epochs, seed=seed,
                                     samples_per_epoch=args.samples_per_epoch, label_weights={"clavicles": 2.0})
            trainer = Trainer(settings, list(DEFAULT_LABELS), train, val, tempfile.mkdtemp())
            start = time.perf_counter()
            result = trainer.fit()
            rates.append(args.epochs * args.samples_per_epoch / (time.perf_counter() - start))
            last = result.history[-1]
            dice.append([last[f"val_dice_{n}"] for n in DEFAULT_LABELS])
            probabilities = torch.sigmoid(trainer.predict_logits(val.images)).numpy()
            boards.append(nyquist_share(probabilities))
            peaks.append(checkerboard_score(probabilities))
        d = np.mean(dice, axis=0)
        print(f"{mode:<16} {count_parameters(trainer.model):>8} {np.mean(rates):>7.1f} {d[0]:>10.3f} {d[1]:>6.3f} "
              f"{d[2]:>9.3f} {d.mean():>6.3f} {1e4 * np.mean(boards):>19.2f} {np.mean(peaks):>10.2f}")


if __name__ == "__main__":
    main()
