"""Raw photos in, aligned faces out: detection (or annotated points) + 5-point alignment,
materialised once per (source images, template, point source, detector settings).

:class:`AlignedFaces` wraps any face set of unaligned photos (CFP as distributed, an image
folder, a pair list) and writes each face warped into ``template`` (normally the backbone's,
``${backbone.input.template}``) under ``out_root/aligned-<key>/`` with a resumable manifest
(:mod:`faceemd.data.materialised`). The 5 points come from the YuNet detector
(:class:`faceemd.data.detection.YuNetDetector`; the box and score are kept in the manifest) or,
with ``points='annotations'``, from the data set's own landmarks (``landmarks5.tsv``, CFP
fiducials of frontal photos, else 68-point landmarks). A photo without a face is reported by
name (error), or skipped and listed with ``on_bad_image='skip'``: never a black crop.
The source's 68-point landmarks are carried into the aligned frame; for a source without them,
``landmark_model`` (an ONNX 68-point model) finds them on the aligned face, so that mask
overlays and the LMK weighting work on raw photos too (kept only where they look like a face).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceemd.data.align import TEMPLATES, align_face, five_points, resolve_template
from faceemd.data.detection import YuNetDetector
from faceemd.data.errors import NoFaceError
from faceemd.data.landmarks import OnnxLandmarker, plausible_landmarks
from faceemd.data.materialised import MaterialisedFaces

__all__ = ["AlignedFaces", "POINT_SOURCES"]

POINT_SOURCES = ("detector", "annotations")


class AlignedFaces(MaterialisedFaces):
    """Faces of ``source`` aligned to ``template``, materialised under ``out_root``.

    points: ``detector`` (YuNet) or ``annotations``; detector: keyword arguments of
    :class:`YuNetDetector` (model, score_threshold, nms_threshold, max_side); landmark_model:
    optional ONNX 68-point model for sources without 68-point landmarks; on_bad_image:
    ``error`` or ``skip``. 68-point landmarks of the source, when known, are carried into the
    aligned frame. Images that share a root folder share the output folder, so a frontal and a
    profile set of one data set (or its pair lists) align each photo once.
    """

    def __init__(
        self,
        source,
        template: str | None,
        out_root: str | Path,
        points: str = "detector",
        detector: dict | None = None,
        landmark_model: str | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if template is None:
            raise ValueError(
                "AlignedFaces needs a template; this backbone declares none "
                "(backbone.input.template): set data.*.template to one of "
                f"{sorted(TEMPLATES)}"
            )
        template = resolve_template(template)
        if points not in POINT_SOURCES:
            raise ValueError(f"points must be one of {POINT_SOURCES}, got {points!r}")
        self.template = template
        self.points = points
        self._detector = YuNetDetector(**(detector or {})) if points == "detector" else None
        self._landmarker = OnnxLandmarker(landmark_model) if landmark_model else None
        root = getattr(source, "root", None)
        recipe = {
            # file-backed sets are keyed by their folder (each image is stamped in the
            # manifest); generated ones by their fingerprint
            "source": str(Path(root).resolve()) if root else source.fingerprint(),
            "template": template,
            "points": points,
            "detector": self._detector.settings() if self._detector else None,
            "landmark_model": Path(landmark_model).name if landmark_model else None,
            "v": 1,
        }
        super().__init__(source, recipe, out_root, "aligned", on_bad_image)

    def _points(self, index: int, image: np.ndarray, lmk: np.ndarray) -> tuple[np.ndarray, dict]:
        if self._detector is not None:
            pts, box, score = self._detector(image)
            return pts, {"box": np.round(box, 1).tolist(), "score": round(score, 4)}
        annotated = self.source.points5(index) if hasattr(self.source, "points5") else None
        if annotated is not None:
            return annotated, {}
        if lmk is not None and np.isfinite(lmk).all() and len(lmk) == 68:
            return five_points(lmk), {}
        raise NoFaceError("no annotated 5 or 68 points for this image; use points=detector")

    def make(self, index: int, image: np.ndarray, lmk: np.ndarray, rel: str):
        try:
            pts, extra = self._points(index, image, lmk)
            aligned, m = align_face(image, pts, self.template)
        except (NoFaceError, ValueError) as err:
            raise NoFaceError(f"{self.source_name(index)}: {err}") from err
        new_lmk = None
        if lmk is not None and np.isfinite(lmk).all():
            new_lmk = np.asarray(lmk, np.float64) @ m[:, :2].T + m[:, 2]
        elif self._landmarker is not None:
            found = self._landmarker(aligned)
            new_lmk = found if plausible_landmarks(found, aligned.shape) else None
        return aligned, new_lmk, {"points5": np.round(pts, 2).reshape(-1).tolist(), **extra}

    def finished(self) -> None:
        self._detector = self._landmarker = None  # networks: not for the loader workers
