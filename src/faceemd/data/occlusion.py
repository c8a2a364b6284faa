"""Out-of-distribution query generators drawn from 68-point landmarks (iBUG-300W order).

The paper occludes queries with face masks and sunglasses placed from detected landmarks and
with random 70% crops resized back (Sec. 3, 4.1). These functions are deterministic given the
``numpy.random.Generator`` they receive. Images are ``(H, W)`` or ``(H, W, 3)`` uint8;
landmarks ``(68, 2)`` (x, y) pixels. Each returns ``(image, landmarks)`` with the landmarks
mapped into the new image (unchanged for overlays).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "OCCLUSIONS",
    "apply_occlusion",
    "crop_keypoints",
    "crop_window",
    "overlay_mask",
    "overlay_sunglasses",
    "random_crop",
]

OCCLUSIONS = ("none", "mask", "sunglasses", "crop")

# Grey levels (or BGR-free intensities on grayscale) of a few mask kinds.
_MASK_SHADES = {"surgical": (200, 235), "cloth": (40, 120), "n95": (225, 250)}


def overlay_mask(image: np.ndarray, lmk: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a face mask (surgical, cloth or N95-like) over nose and mouth, from jaw points 1-15
    up to the nose bridge (point 29)."""
    out = image.copy()
    kind = rng.choice(list(_MASK_SHADES))
    lo, hi = _MASK_SHADES[kind]
    shade = int(rng.integers(lo, hi))
    jaw = lmk[1:16]
    # Top edge through the nose bridge (point 29), parallel to the line between the eyes.
    eyes = lmk[42:48].mean(0) - lmk[36:42].mean(0)
    along = eyes / max(float(np.linalg.norm(eyes)), 1e-6)
    bridge = lmk[29]
    left_top = bridge + along * float((lmk[1] - bridge) @ along)
    right_top = bridge + along * float((lmk[15] - bridge) @ along)
    top = [left_top, lmk[28], right_top] if kind == "n95" else [left_top, right_top]
    poly = np.vstack([np.asarray(top, float), jaw[::-1]]).round().astype(np.int32)
    bridge_y = bridge[1]
    colour = (shade,) * (3 if out.ndim == 3 else 1)
    cv2.fillPoly(out, [poly], colour, lineType=cv2.LINE_AA)
    if kind == "surgical":  # pleats
        for t in (0.3, 0.5, 0.7):
            y = int(bridge_y + t * (lmk[8, 1] - bridge_y))
            cv2.line(out, (int(lmk[2, 0]), y), (int(lmk[14, 0]), y), (shade - 40,) * len(colour), 1)
    return out


def overlay_sunglasses(image: np.ndarray, lmk: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw dark lenses over both eyes (points 36-41, 42-47) joined by a bridge."""
    out = image.copy()
    left, right = lmk[36:42].mean(0), lmk[42:48].mean(0)
    dist = float(np.linalg.norm(right - left))
    axes = (int(round(dist * rng.uniform(0.42, 0.5))), int(round(dist * rng.uniform(0.3, 0.38))))
    angle = float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))
    shade = int(rng.integers(0, 40))
    colour = (shade,) * (3 if out.ndim == 3 else 1)
    for c in (left, right):
        center = (int(round(c[0])), int(round(c[1])))
        cv2.ellipse(out, center, axes, angle, 0, 360, colour, -1, lineType=cv2.LINE_AA)
    p0 = (int(left[0] + axes[0] * 0.9), int(left[1]))
    p1 = (int(right[0] - axes[0] * 0.9), int(right[1]))
    cv2.line(out, p0, p1, colour, max(1, int(dist * 0.06)))
    return out


def crop_window(
    h: int, w: int, rng: np.random.Generator, fraction: float = 0.7
) -> tuple[int, int, int, int]:
    """``(y0, x0, ch, cw)`` of a random window holding ``fraction`` of each side."""
    ch, cw = int(round(h * fraction)), int(round(w * fraction))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    return y0, x0, ch, cw


def crop_keypoints(
    points: np.ndarray, window: tuple[int, int, int, int], h: int, w: int
) -> np.ndarray:
    """Map ``(N, 2)`` points into the window resized back to ``(h, w)``."""
    y0, x0, ch, cw = window
    return (points - [x0, y0]) * np.array([w / cw, h / ch])


def random_crop(
    image: np.ndarray, lmk: np.ndarray | None, rng: np.random.Generator, fraction: float = 0.7
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop a random window of ``fraction`` of each side and resize it back (LFW-crop)."""
    h, w = image.shape[:2]
    y0, x0, ch, cw = crop_window(h, w, rng, fraction)
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    out = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
    if lmk is None:
        return out, None
    return out, crop_keypoints(lmk, (y0, x0, ch, cw), h, w)


def apply_occlusion(
    image: np.ndarray, lmk: np.ndarray | None, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one of :data:`OCCLUSIONS`; overlays need landmarks."""
    if kind == "none":
        return image, lmk
    if kind == "crop":
        return random_crop(image, lmk, rng)
    if kind not in OCCLUSIONS:
        raise ValueError(f"unknown occlusion {kind!r}; choose one of {OCCLUSIONS}")
    if lmk is None or not np.isfinite(lmk).all():
        raise ValueError(f"occlusion {kind!r} needs 68 facial landmarks for every image")
    fn = overlay_mask if kind == "mask" else overlay_sunglasses
    return fn(image, lmk, rng), lmk
