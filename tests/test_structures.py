"""Multi-label bit fields: overlaps survive, groups are unions."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.structures import (
    DEFAULT_LABELS, SCR_STRUCTURES, fractions_to_uint8, labels_from_fractions, labels_from_packed, pack_masks, unpack_masks,
)


def test_pack_unpack_keeps_overlaps():
    rng = np.random.default_rng(0)
    masks = {name: rng.random((20, 30)) > 0.5 for name in SCR_STRUCTURES}
    packed = pack_masks(masks, SCR_STRUCTURES)
    assert packed.dtype == np.uint8
    back = unpack_masks(packed, SCR_STRUCTURES)
    for name in SCR_STRUCTURES:
        assert np.array_equal(back[name], masks[name])


def test_label_groups_are_unions():
    masks = {name: np.zeros((4, 4), bool) for name in SCR_STRUCTURES}
    masks["left_lung"][0, 0] = True
    masks["right_lung"][1, 1] = True
    masks["left_clavicle"][0, 0] = True  # clavicle over lung: both channels on
    target = labels_from_packed(pack_masks(masks, SCR_STRUCTURES), SCR_STRUCTURES, DEFAULT_LABELS)
    assert target.shape == (3, 4, 4) and target.dtype == np.float32
    heart, lungs, clavicles = target
    assert heart.sum() == 0
    assert lungs[0, 0] == 1 and lungs[1, 1] == 1 and lungs.sum() == 2
    assert clavicles[0, 0] == 1 and clavicles.sum() == 1


def test_unknown_structure_in_labels():
    with pytest.raises(ValueError, match="spleen"):
        labels_from_packed(np.zeros((2, 2), np.uint8), SCR_STRUCTURES, {"x": ["spleen"]})


def test_soft_labels_sum_a_groups_shares_and_refuse_what_is_not_there():
    """labels_from_fractions: a label's share is the sum of its structures'
    shares (left + right never overlap), capped at 1; uint8 x 255 storage."""
    shares = np.zeros((2, 3, len(SCR_STRUCTURES)), np.float32)
    index = {name: i for i, name in enumerate(SCR_STRUCTURES)}
    shares[0, 0, index["left_lung"]] = 0.25
    shares[0, 0, index["right_lung"]] = 0.5
    shares[0, 1, index["left_clavicle"]] = 0.75
    shares[0, 1, index["right_clavicle"]] = 0.75  # not SCR anatomy: the cap shows
    shares[1, 2, index["heart"]] = 1.0
    stored = fractions_to_uint8(shares)
    assert stored.dtype == np.uint8 and stored.max() == 255
    target = labels_from_fractions(stored, SCR_STRUCTURES, DEFAULT_LABELS)
    assert target.shape == (len(DEFAULT_LABELS), 2, 3) and target.dtype == np.float32
    channel = {name: c for c, name in enumerate(DEFAULT_LABELS)}
    assert target[channel["lungs"], 0, 0] == pytest.approx(0.75, abs=1 / 255)
    assert target[channel["clavicles"], 0, 1] == 1.0
    assert target[channel["heart"], 1, 2] == 1.0 and target[channel["heart"], 0, 0] == 0.0
    with pytest.raises(ValueError, match="spleen"):
        labels_from_fractions(stored, SCR_STRUCTURES, {"x": ["spleen"]})
    with pytest.raises(ValueError, match="fraction channels"):
        labels_from_fractions(stored[:, :, :2], SCR_STRUCTURES, DEFAULT_LABELS)
