"""Multi-label bit fields: overlaps survive, groups are unions."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.structures import DEFAULT_LABELS, SCR_STRUCTURES, labels_from_packed, pack_masks, unpack_masks


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
