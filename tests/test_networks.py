"""Networks and decoder upsampling (issue 13): every network x upsampling
pair builds, keeps the input's size and trains through the Trainer and
``medseg train``; the unsupported pairs are refused by name; the pieces do
what the literature says; the checkerboard measure can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from medseg.evaluation.checkerboard import checkerboard_score, input_gradient, nyquist_share
from medseg.phantoms.anatomy import render_phantom
from medseg.phantoms.write import write_phantom_dataset
from medseg.preprocessing.preprocess import DatasetSpec, PreprocessSettings, preprocess_dataset
from medseg.preprocessing.splits import make_splits, write_splits
from medseg.structures import DEFAULT_LABELS
from medseg.training.fcn import bilinear_kernel
from medseg.training.network import NETWORK_UPSAMPLING, NETWORKS, NetworkSpec, build_network
from medseg.training.upsampling import UPSAMPLING, Upsample2x

PAIRS = [(n, u) for n, modes in NETWORK_UPSAMPLING.items() for u in modes]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("networks")
    write_phantom_dataset(tmp / "raw", n=6, seed=3, shape=(128, 112))
    result = preprocess_dataset(DatasetSpec(images=tmp / "raw" / "images", masks_root=tmp / "raw" / "masks"),
                                PreprocessSettings(size=64), tmp / "pre", workers=1)
    assert not result.failures
    splits = tmp / "splits.json"
    write_splits(splits, make_splits([r["case_id"] for r in result.rows], "kfold", k=3, seed=0, val_fraction=0.2))
    return tmp, result.manifest_path, splits


def test_every_network_and_upsampling_is_listed_with_what_it_supports():
    assert set(NETWORK_UPSAMPLING) == set(NETWORKS)
    assert set(NETWORK_UPSAMPLING["segnet"]) == set(UPSAMPLING)  # the decoder comparison's network
    assert "max_unpool" not in NETWORK_UPSAMPLING["basic_unet"]  # no pooling indices there


@pytest.mark.parametrize("network, upsample", PAIRS)
def test_network_keeps_the_input_size_and_learns(network, upsample):
    torch.manual_seed(0)
    net = build_network(NetworkSpec(network, "cpu_tiny", upsample, out_channels=3))
    # 80 x 112: a multiple of 16 but not of 32 (the ResNet encoders pad inside).
    x = torch.rand(2, 1, 80, 112)
    target = (x > 0.5).float().expand(-1, 3, -1, -1)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        logits = net(x)
        assert logits.shape == (2, 3, 80, 112)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], f"{network}/{upsample}: loss {losses}"


@pytest.mark.parametrize("network, upsample, works_with", [
    ("basic_unet", "max_unpool", "segnet"),
    ("unet", "resize_bilinear", "basic_unet, segnet, fcn8s, deeplabv3"),
    ("deeplabv3", "transposed_k3s2", "basic_unet, segnet"),
    ("fcn8s", "pixel_shuffle", "basic_unet, segnet"),
])
def test_unsupported_pairs_are_refused_naming_what_works(network, upsample, works_with):
    with pytest.raises(ValueError, match=f"network '{network}' cannot use upsample '{upsample}'") as error:
        NetworkSpec(network, "cpu_tiny", upsample)
    assert f"works with {works_with}" in str(error.value)


def test_max_unpool_puts_values_back_where_the_pooling_took_them():
    up = Upsample2x("max_unpool", 1, 1)
    with torch.no_grad():
        up.pre.weight.fill_(1.0)
        up.pre.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4).flip(-1)  # maxima not at the top-left
    pooled, indices = F.max_pool2d(x, 2, return_indices=True)
    out = up(pooled, indices)
    assert torch.equal(out, torch.where(out != 0, x, 0.0)) and int((out != 0).sum()) == 4
    assert torch.equal(out.amax(dim=(-2, -1)), x.amax(dim=(-2, -1)))
    with pytest.raises(ValueError, match="needs the encoder's max-pooling indices"):
        up(pooled)


def test_bed_of_nails_inserts_zeros_and_k3s2_overlaps_unevenly():
    nails = Upsample2x("bed_of_nails", 1, 1)
    with torch.no_grad():
        nails.pre.weight.fill_(1.0)
        nails.pre.bias.zero_()
    out = nails(torch.ones(1, 1, 3, 3))
    assert out[0, 0, ::2, ::2].eq(1).all() and out.sum() == 9
    # A transposed convolution with all-ones kernel 3, stride 2 on a constant
    # input: interior outputs get 1, 2 or 4 taps (Odena et al. 2016's picture).
    k3 = Upsample2x("transposed_k3s2", 1, 1)
    with torch.no_grad():
        for p in k3.parameters():
            p.fill_(1.0) if p.dim() > 1 else p.zero_()
    taps = k3(torch.ones(1, 1, 6, 6))[0, 0, 2:-2, 2:-2]
    assert set(taps.unique().tolist()) == {1.0, 2.0, 4.0}
    k2 = Upsample2x("transposed", 1, 1)  # kernel 2, stride 2: even overlap
    with torch.no_grad():
        for p in k2.parameters():
            p.fill_(1.0) if p.dim() > 1 else p.zero_()
    assert k2(torch.ones(1, 1, 6, 6)).unique().tolist() == [1.0]


def test_fcn_bilinear_initialisation_is_bilinear_interpolation():
    kernel = bilinear_kernel(1, 4)
    x = torch.rand(1, 1, 8, 8)
    up = F.conv_transpose2d(x, kernel, stride=2, padding=1)
    reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])


def _radiograph(size: int = 128) -> torch.Tensor:
    image, _ = render_phantom(5, shape=(size, size))
    image = image.astype(np.float32)
    image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
    return torch.from_numpy(image)[None, None]


def test_checkerboard_score_flags_k3s2_transposed_at_initialisation_not_resize_convolution():
    x = _radiograph()
    scores = {}
    for upsample in ("transposed_k3s2", "resize_bilinear", "resize_nearest"):
        torch.manual_seed(0)
        net = build_network(NetworkSpec("segnet", "cpu_tiny", upsample, out_channels=3)).eval()
        with torch.no_grad():
            probabilities = torch.sigmoid(net(x)).numpy()
        scores[upsample] = checkerboard_score(probabilities)
    assert scores["transposed_k3s2"] > 3.0, scores
    assert scores["resize_bilinear"] < 2.0 and scores["resize_nearest"] < 2.0, scores


def test_checkerboard_measures_on_known_patterns():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    smooth = np.exp(-((yy - 30) ** 2 + (xx - 34) ** 2) / 200.0)
    board = smooth + 0.05 * ((yy + xx) % 2)
    disc = ((yy - 30.3) ** 2 + (xx - 33.6) ** 2 < 20 ** 2).astype(float)  # sharp edges, no pattern
    assert checkerboard_score(board) > 10 * checkerboard_score(smooth)
    assert checkerboard_score(disc) < 1.5
    assert nyquist_share(board) > nyquist_share(smooth) and nyquist_share(np.ones((10, 10))) == 0.0
    assert checkerboard_score(np.stack([board, board + rng.normal(0, 1e-3, board.shape)])) > 10
    with pytest.raises(ValueError, match="even H, W"):
        checkerboard_score(np.zeros((7, 8)))
    with pytest.raises(ValueError, match="even H, W"):
        checkerboard_score(np.zeros((9, 9)))
    # Found by a fresh user: NaN read as "no checkerboard", a constant map
    # halving the score, an empty stack's raw numpy error.
    with pytest.raises(ValueError, match="NaN or infinite"):
        checkerboard_score(np.where(disc > 0, np.nan, 0.0))
    with pytest.raises(ValueError, match="no maps"):
        checkerboard_score(np.zeros((0, 64, 64)))
    assert checkerboard_score(np.stack([np.ones((64, 64)), disc])) == pytest.approx(checkerboard_score(disc))
    assert checkerboard_score(1e200 * board) == pytest.approx(checkerboard_score(board))
    assert checkerboard_score((yy + xx) % 2) == np.inf and checkerboard_score(np.ones((64, 64))) == 0.0
    # Second trial: values near 1e308 overflowed (0.0 or nan), a 10 x 10
    # checkerboard read 3.8e33, bfloat16 tensors were refused.
    assert checkerboard_score(1e308 * ((yy + xx) % 2)) == np.inf
    assert checkerboard_score(np.full((64, 64), 1.7e308)) == 0.0
    small = np.add.outer(np.arange(10), np.arange(10)) % 2
    assert checkerboard_score(small) == np.inf
    assert checkerboard_score(torch.as_tensor(board, dtype=torch.bfloat16)) > 10


def test_input_gradient_has_the_input_shape_and_shows_strided_encoders():
    x = _radiograph(64)
    torch.manual_seed(0)
    net = build_network(NetworkSpec("fcn8s", "cpu_tiny", "resize_bilinear", out_channels=3))
    net.train()
    running = net.backbone.resnet.bn1.running_mean.clone()
    with torch.no_grad():  # works there too
        gradient = input_gradient(net, x)
    assert gradient.shape == (1, 1, 64, 64) and np.abs(gradient).sum() > 0
    # Left as found: training mode, batch-norm statistics, no parameter gradients.
    assert net.training and torch.equal(net.backbone.resnet.bn1.running_mean, running)
    assert all(p.grad is None for p in net.parameters())


def test_every_network_trains_through_medseg_train(tiny_dataset, repo_root, tmp_path):
    """``medseg train`` (what the workflow's train rule runs), in-process, for
    every network but the default basic_unet (which test_training and the
    workflow tests train through it); every pair trains above."""
    from medseg.cli import main
    from medseg.inference.model import load_model

    tmp, manifest, splits = tiny_dataset
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pairs = [("segnet", "max_unpool"), ("fcn8s", "transposed"), ("deeplabv3", "resize_bilinear"),
             ("unet", "transposed")]
    for network, upsample in pairs:
        config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
        config["dataset"] = "networks"
        config["train"].update(network=network, upsample=upsample, preset="cpu_tiny", epochs=1,
                               samples_per_epoch=8, validate_every=1)
        path = tmp_path / f"{network}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / network
        rc = main(["train", "--config", str(path), "--manifest", str(manifest), "--splits", str(splits),
                   "--fold", "0", "--out", str(out), "--tracking-uri", uri])
        assert rc == 0, network
        summary = json.loads((out / "model.json").read_text())
        model = load_model(str(out / "best.pt"))
        assert type(model.module.net).__name__ == {"segnet": "SegNet", "fcn8s": "FCN8s",
                                                   "deeplabv3": "DeepLabV3", "unet": "UNet"}[network]
        run = __import__("mlflow").MlflowClient(uri).get_run(summary["run_id"])
        assert run.data.tags["medseg.network"] == network and run.data.tags["medseg.upsample"] == upsample
        assert run.data.params["train.upsample"] == upsample


def test_a_size_the_network_cannot_take_is_refused_by_medseg_train(tmp_path, repo_root, caplog):
    """MONAI UNet needs a multiple of 16 (it crashed mid-forward with a
    tensor-size error); the other networks take any size."""
    from medseg.cli import main
    from medseg.errors import SettingsMismatch
    from medseg.training.data import CaseTensors
    from medseg.training.settings import TrainSettings
    from medseg.training.trainer import Trainer

    write_phantom_dataset(tmp_path / "raw", n=4, seed=3, shape=(128, 112))
    result = preprocess_dataset(DatasetSpec(images=tmp_path / "raw" / "images", masks_root=tmp_path / "raw" / "masks"),
                                PreprocessSettings(size=72), tmp_path / "pre", workers=1)
    splits = tmp_path / "splits.json"
    write_splits(splits, make_splits([r["case_id"] for r in result.rows], "kfold", k=2, seed=0, val_fraction=0.2))
    config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    config["train"].update(network="unet", upsample="transposed", preset="cpu_tiny", epochs=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("ERROR", logger="medseg"):
        rc = main(["train", "--config", str(path), "--manifest", str(result.manifest_path), "--splits", str(splits),
                   "--fold", "0", "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 2
    assert "cannot train: network 'unet' needs preprocess.size to be a multiple of 16, got 72" in caplog.text
    cases = CaseTensors(["a"], torch.rand(1, 1, 72, 72), torch.zeros(1, 3, 72, 72))
    for network, upsample in (("segnet", "max_unpool"), ("fcn8s", "transposed"), ("deeplabv3", "resize_bilinear")):
        trainer = Trainer(TrainSettings(network=network, upsample=upsample, preset="cpu_tiny", epochs=1),
                          list(DEFAULT_LABELS), cases, cases, tmp_path / network)
        with torch.no_grad():
            assert trainer.model(cases.images).shape == (1, 3, 72, 72)
    with pytest.raises(SettingsMismatch, match="patch_size 80 is larger than the preprocessed size 72"):
        Trainer(TrainSettings(preset="cpu_tiny", patch_size=80), list(DEFAULT_LABELS), cases, cases, tmp_path / "p")
    # Second trial: fcn8s on 32 px patches of 72 px images died on batch norm mid-epoch.
    with pytest.raises(SettingsMismatch, match="'fcn8s' needs train.patch_size of at least 64, got 32"):
        Trainer(TrainSettings(network="fcn8s", upsample="transposed", preset="cpu_tiny", patch_size=32),
                list(DEFAULT_LABELS), cases, cases, tmp_path / "q")


def test_resnet_networks_need_64_px():
    """At 32 px their deepest features are 1x1, and batch normalisation of a
    last batch of one image failed mid-epoch."""
    from medseg.errors import SettingsMismatch
    from medseg.training.network import check_input_size

    for network in ("fcn8s", "deeplabv3"):
        with pytest.raises(SettingsMismatch, match=f"'{network}' needs preprocess.size of at least 64, got 32"):
            check_input_size(NetworkSpec(network, "cpu_tiny", "resize_bilinear"), 32)
        check_input_size(NetworkSpec(network, "cpu_tiny", "resize_bilinear"), 64)
    check_input_size(NetworkSpec("segnet", "cpu_tiny", "max_unpool"), 36)
