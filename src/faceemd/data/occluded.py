"""Occluded query sets materialised to disk once, with a manifest (paper Sec. 3, 4.1).

:class:`OccludedFaces` turns any face set (LFW folder, CALFW, AgeDB, synthetic, ...) into
occluded copies (``mask``, ``sunglasses`` or ``crop``, see :mod:`faceemd.data.occlusion`) under
``out_root/<occlusion>-<key>/``, where the key hashes the source set's fingerprint, the
occlusion and the seed (resumable and shared by the jobs of a sweep, see
:mod:`faceemd.data.materialised`). Each image's occluder is drawn from a generator seeded by
``(seed, crc32(relative path))``, so an image gets the same pixels whatever the order or the
resumption point.

Landmarks come from the source set's annotations, else from an ONNX landmark model
(``landmark_model``); an image without usable landmarks is an error naming it, or a skipped
entry in the manifest with ``on_bad_image='skip'``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from faceemd.data.errors import NoFaceError
from faceemd.data.landmarks import OnnxLandmarker, plausible_landmarks
from faceemd.data.materialised import MaterialisedFaces, source_stamps
from faceemd.data.occlusion import OCCLUSIONS, apply_occlusion

__all__ = ["OccludedFaces"]


class OccludedFaces(MaterialisedFaces):
    """Occluded copies of ``source`` (any face set), materialised under ``out_root``.

    source: a face set whose items are ``(image, name, landmarks)``; occlusion: one of
    ``mask``, ``sunglasses``, ``crop``; seed: base seed of the per-image generators;
    landmark_model: optional ONNX 68-point model for images without annotations;
    on_bad_image: ``error`` or ``skip`` (unreadable source image, no detectable face).
    Behaves as a file-backed face set over the written PNGs, in source order.
    """

    def __init__(
        self,
        source,
        occlusion: str,
        out_root: str | Path,
        seed: int = 0,
        landmark_model: str | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if occlusion not in OCCLUSIONS or occlusion == "none":
            raise ValueError(f"occlusion must be one of {OCCLUSIONS[1:]}, got {occlusion!r}")
        self.occlusion = occlusion
        self.seed = seed
        self.landmark_model = landmark_model
        self._landmarker = None
        stamps = source_stamps(source)  # one pass for the recipe and the manifest check
        found = source.fingerprint() if stamps is None else source.fingerprint(stamps=stamps)
        recipe = {"source": found, "occlusion": occlusion, "seed": seed, "v": 1}
        super().__init__(source, recipe, out_root, occlusion, on_bad_image, stamps)

    def _landmarks_for(self, image: np.ndarray, lmk: np.ndarray, rel: str) -> np.ndarray:
        if lmk is not None and np.isfinite(lmk).all():
            return lmk
        if self.landmark_model is None:
            raise NoFaceError(
                f"{rel}: no landmark annotation and no landmark model; set "
                "data.query.landmark_model (e.g. ../shared/weights/pfld_68.onnx) or add "
                "landmarks68.tsv"
            )
        if self._landmarker is None:
            self._landmarker = OnnxLandmarker(self.landmark_model)
        found = self._landmarker(image)
        if not plausible_landmarks(found, image.shape):
            raise NoFaceError(f"{rel}: no face detected (landmarks implausible)")
        return found

    def make(self, index: int, image: np.ndarray, lmk: np.ndarray, rel: str):
        if self.occlusion != "crop":
            lmk = self._landmarks_for(image, lmk, rel)
        rng = np.random.default_rng([self.seed, zlib.crc32(rel.encode())])
        out, new_lmk = apply_occlusion(image, lmk, self.occlusion, rng)
        return out, new_lmk, {}

    def finished(self) -> None:
        self._landmarker = None  # an onnxruntime session: not for the loader workers
