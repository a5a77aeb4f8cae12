"""The artifacts analyser: clean toy pictures (drawn, and through the toy VAE) are clean; the same
pictures with blotches, holes or noise are not; its numpy pieces on pictures small enough to
check by hand."""
import numpy as np
import pytest
import torch

from tools import artifacts as A
from tools.toydata import COLORS


@pytest.fixture(scope="module")
def calibration():
    return A.calibrate(48, seed=0)


def clean_share(rows):
    return sum(r["clean"] for r in rows) / len(rows)


def test_drawn_pictures_and_their_vae_round_trips_are_clean(calibration):
    for kind in ("drawn", "VAE round trip"):
        bad = [r for r in calibration[kind] if not r["clean"]]
        assert not bad, (kind, bad)


@pytest.mark.parametrize("kind", A.KINDS)
def test_injected_defects_are_not_clean(calibration, kind):
    assert clean_share(calibration[kind]) <= 0.05, kind


def test_each_measure_sees_its_defect(calibration):
    """Blotches are stray blobs, holes lower the solidity, noise lowers the background purity."""
    assert all(r["stray_blobs"] >= 1 for r in calibration["blotches"])
    assert all(r["solidity"] < A.MIN_SOLIDITY for r in calibration["holes"])
    for kind in ("noise", "salt-and-pepper"):
        assert all(r["background_purity"] < A.MIN_PURITY for r in calibration[kind])


def picture(size=32, bg="white"):
    return np.broadcast_to(np.array(COLORS[bg], np.float32)[:, None, None], (3, size, size)).copy()


def test_a_square_a_second_object_and_an_empty_picture():
    x = picture()
    x[:, 8:20, 6:18] = np.array(COLORS["red"])[:, None, None]
    got = A.artifacts(torch.from_numpy(x))
    assert got["clean"] and got["solidity"] == 1.0 and got["background_purity"] == 1.0
    x[:, 10:16, 24:29] = np.array(COLORS["blue"])[:, None, None]
    assert A.artifacts(x, n_objects=1)["stray_blobs"] == 1               # not named: a stray
    assert A.artifacts(x, n_objects=2)["clean"]
    empty = A.artifacts(picture())
    assert empty["solidity"] == 0.0 and not empty["clean"]


def test_components_hull_and_fill():
    m = np.zeros((6, 7), bool)
    m[0:2, 0:3] = True                         # area 6
    m[2, 3] = True                             # touches it diagonally: 8-connected, area 7
    m[4:6, 5:7] = True                         # area 4
    labels, areas = A.components(m)
    assert areas.tolist() == [7, 4] and labels[2, 3] == 1 and labels[5, 6] == 2
    hull = A.convex_hull(np.array([[0, 0], [4, 0], [4, 4], [0, 4], [2, 2], [2, 0]]))
    assert sorted(map(tuple, hull.tolist())) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert A.fill_polygon(hull, (6, 6)).sum() == 25                  # the 5×5 pixel centres
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False                     # a 3×3 hole in a 7×7 square
    assert A.solidity(ring) == pytest.approx(40 / 49)
