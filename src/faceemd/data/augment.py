"""Training augmentation with albumentations, including the paper's occluders (Sec. 4.3).

:class:`FaceOcclusion` is an albumentations ``DualTransform`` that draws a face mask, sunglasses
(from the 68 landmarks passed as keypoints) or a 70% crop resized back, and moves the keypoints
accordingly; :func:`build_augment` composes it with the usual flip and photometric jitter.
Images without landmarks are left unoccluded by the overlay kinds (they can use precomputed
masked copies instead, see :class:`faceemd.data.train_datamodule.TrainFaces`).
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np

from faceemd.data.landmarks import MIRROR_68
from faceemd.data.occlusion import apply_occlusion, crop_keypoints, crop_window

__all__ = ["FaceOcclusion", "MirrorLandmarks", "build_augment"]


class FaceOcclusion(A.DualTransform):
    """Occlude the face with probability ``p``; kinds among ``mask``, ``sunglasses``, ``crop``.

    Expects the 68 landmarks as ``keypoints`` (format ``xy``) when overlays are wanted.
    """

    def __init__(self, kinds: Sequence[str] = ("mask",), p: float = 0.5) -> None:
        super().__init__(p=p)
        bad = set(kinds) - {"mask", "sunglasses", "crop"}
        if bad or not kinds:
            raise ValueError(f"occlusion kinds must be among mask, sunglasses, crop; got {kinds}")
        self.kinds = tuple(kinds)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        kind = self.py_random.choice(self.kinds)
        seed = int(self.random_generator.integers(2**31))
        points = data.get("keypoints")
        lmk = None
        if points is not None and len(points) == 68:
            lmk = np.asarray(points, np.float64)[:, :2]
            if not np.isfinite(lmk).all():
                lmk = None
        window = crop_window(h, w, np.random.default_rng(seed)) if kind == "crop" else None
        return {"kind": kind, "seed": seed, "lmk": lmk, "window": window}

    def apply(self, img: np.ndarray, kind: str, seed: int, lmk, window, **params) -> np.ndarray:
        if kind != "crop" and lmk is None:
            return img
        out, _ = apply_occlusion(img, lmk, kind, np.random.default_rng(seed))
        return out

    def apply_to_keypoints(self, keypoints: np.ndarray, kind: str, window, **params) -> np.ndarray:
        if kind != "crop":
            return keypoints
        h, w = params["shape"][:2]
        out = keypoints.copy()
        out[:, :2] = crop_keypoints(keypoints[:, :2], window, h, w)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("kinds",)


class MirrorLandmarks(A.HorizontalFlip):
    """Horizontal flip that also re-indexes the 68 landmarks (left eye becomes right eye)."""

    def apply_to_keypoints(self, keypoints: np.ndarray, **params) -> np.ndarray:
        flipped = super().apply_to_keypoints(keypoints, **params)
        return flipped[MIRROR_68] if len(flipped) == 68 else flipped


def build_augment(
    p_occlusion: float = 0.5,
    kinds: Sequence[str] = ("mask",),
    p_flip: float = 0.5,
    p_jitter: float = 0.3,
    seed: int | None = None,
) -> A.Compose:
    """Occluder, mirror flip and brightness/contrast jitter over ``image`` + ``keypoints`` (xy).

    Call as ``aug(image=uint8 image, keypoints=(68, 2) array)``.
    """
    transforms = []
    if p_occlusion > 0:
        transforms.append(FaceOcclusion(kinds, p=p_occlusion))
    if p_flip > 0:
        transforms.append(MirrorLandmarks(p=p_flip))
    if p_jitter > 0:
        transforms.append(A.RandomBrightnessContrast(0.2, 0.2, p=p_jitter))
    return A.Compose(
        transforms,
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
        seed=seed,
    )
