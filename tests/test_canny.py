"""Our Canny and resize_image (minip2p/real/canny.py) against OpenCV, which the official ControlNet
annotator calls: cv2.Canny(rgb_uint8, 100, 200) and its resize_image (LANCZOS4 up / AREA down)."""
import cv2
import numpy as np
import pytest

from minip2p.errors import ParameterError
from minip2p.real.canny import canny, hwc3, resize_image


def pictures():
    """Drawn test pictures: noise, gradients, thin lines, shapes, text-like strokes, noisy."""
    rng = np.random.default_rng(0)
    H, W = 96, 128
    yy, xx = np.mgrid[0:H, 0:W]
    out = {"noise": rng.integers(0, 256, (H, W, 3), dtype=np.uint8)}
    grad = np.stack([xx * 5, yy * 3 + xx, (xx * yy) // 8], -1) % 256     # ramps that wrap: steps
    out["gradients"] = grad.astype(np.uint8)
    im = np.full((H, W, 3), 30, np.uint8)
    cv2.circle(im, (40, 40), 25, (200, 50, 20), -1, lineType=cv2.LINE_AA)
    cv2.rectangle(im, (70, 20), (120, 80), (20, 180, 220), -1)
    cv2.fillPoly(im, [np.array([[10, 90], [60, 60], [90, 95]], np.int32)], (240, 240, 0),
                 lineType=cv2.LINE_AA)
    out["shapes"] = im
    im = np.full((H, W, 3), 255, np.uint8)
    for i in range(12):
        a, b = rng.integers(0, (W, H)), rng.integers(0, (W, H))
        cv2.line(im, tuple(map(int, a)), tuple(map(int, b)), tuple(map(int, rng.integers(0, 256, 3))),
                 1, lineType=cv2.LINE_AA if i % 2 else cv2.LINE_8)
    out["thin lines"] = im
    im = np.full((H, W, 3), 240, np.uint8)
    cv2.putText(im, "Minip2p", (5, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (10, 10, 90), 2, cv2.LINE_AA)
    cv2.putText(im, "edges", (10, 85), cv2.FONT_HERSHEY_PLAIN, 2.0, (120, 0, 40), 1)
    out["text"] = im
    blurred = cv2.GaussianBlur(out["shapes"], (5, 5), 1.2).astype(np.float32)
    out["noisy shapes"] = (blurred + rng.normal(0, 12, blurred.shape)).clip(0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("name", list(pictures()))
def test_canny_equals_opencv(name):
    im = pictures()[name]
    for low, high in [(100, 200), (50, 120), (220, 90)]:
        ours, theirs = canny(im, low, high), cv2.Canny(im, low, high)
        assert ours.dtype == np.uint8 and ours.shape == im.shape[:2]
        assert set(np.unique(ours)) <= {0, 255}
        assert (ours == theirs).mean() >= 0.995, (name, low, high, (ours == theirs).mean())
    assert (theirs > 0).mean() > 0.01                     # the picture has edges to find


def test_canny_grey_and_edges_present():
    im = pictures()["shapes"]
    grey = im[:, :, 1].copy()
    assert (canny(grey) == cv2.Canny(grey, 100, 200)).mean() >= 0.995
    assert 0.01 < (canny(im) > 0).mean() < 0.2           # the shapes' outlines, nothing else


def test_hwc3_as_the_annotator():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert (hwc3(grey) == grey[:, :, None]).all() and hwc3(grey).shape == (5, 7, 3)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    a = rgba[:, :, 3:].astype(np.float32) / 255
    want = (rgba[:, :, :3].astype(np.float32) * a + 255 * (1 - a)).clip(0, 255).astype(np.uint8)
    assert (hwc3(rgba) == want).all()
    with pytest.raises(ParameterError):
        hwc3(grey.astype(np.float32))


def official_resize(img, resolution):
    H, W = img.shape[:2]
    k = resolution / min(H, W)
    H, W = int(np.round(H * k / 64.0)) * 64, int(np.round(W * k / 64.0)) * 64
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


@pytest.mark.parametrize("shape,res", [((64, 64, 3), 512), ((50, 70, 3), 512), ((700, 900, 3), 512),
                                       ((512, 700, 3), 512), ((300, 600, 3), 256),
                                       ((128, 96, 3), 64)])
def test_resize_image_as_the_annotator(shape, res):
    rng = np.random.default_rng(2)
    im = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 1.5)
    ours, theirs = resize_image(im, res), official_resize(im, res)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    d = np.abs(ours.astype(int) - theirs)
    assert d.max() <= 1 and (d == 0).mean() >= 0.9     # float vs OpenCV's float32/fixed point


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ParameterError):
        canny(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ParameterError):
        canny(np.zeros((8, 8, 3), np.uint8), float("nan"), 200)
    with pytest.raises(ParameterError):
        resize_image(np.zeros((8, 8, 3), np.uint8), 0)
