"""68-point facial landmarks from an ONNX model run by onnxruntime (e.g. PFLD ``pfld_68.onnx``).

Used when a face set has no landmark annotations: mask/sunglasses overlays and the LMK
weighting need the 68 iBUG-300W points. The model takes ``(N, 3, S, S)`` RGB in [0, 1]
(S = 112 for PFLD) and returns ``(N, 136)`` points normalised to the crop. Detection runs two
passes, as ``shared/data/README.md`` describes for the distributed landmarks: the whole image,
then a square box 1.2x the extent of the first points; each pass averages the prediction with
that of the mirrored crop. Nothing is downloaded: the model path comes from config.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = ["MIRROR_68", "OnnxLandmarker", "plausible_landmarks"]

# Index of each point's mirror image in the iBUG-300W 68-point order.
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 21, -1))
    + list(range(21, 16, -1))  # eyebrows
    + [27, 28, 29, 30]
    + [35, 34, 33, 32, 31]  # nose
    + [45, 44, 43, 42, 47, 46]
    + [39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)


def plausible_landmarks(lmk: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Detected 68 points look like a face: mostly inside the image, eyes apart."""
    h, w = shape[:2]
    inside = ((lmk[:, 0] >= 0) & (lmk[:, 0] < w) & (lmk[:, 1] >= 0) & (lmk[:, 1] < h)).mean()
    eyes = float(np.linalg.norm(lmk[42:48].mean(0) - lmk[36:42].mean(0)))
    return bool(inside >= 0.8 and eyes >= 0.1 * w)


class OnnxLandmarker:
    """model_path: an ONNX landmark model; input_size: its square input side (PFLD: 112)."""

    def __init__(self, model_path: str | Path, input_size: int = 112, threads: int = 1) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"landmark model not found: {path} (set data.landmark_model to an ONNX file, "
                "e.g. ../shared/weights/pfld_68.onnx, or provide landmarks68.tsv annotations)"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.size = input_size

    def _predict(self, image: np.ndarray, box: tuple[float, float, float]) -> np.ndarray:
        """Points in image pixels for the square box ``(x0, y0, side)``, mirror-averaged."""
        x0, y0, side = box
        scale = self.size / side
        m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
        crop = cv2.warpAffine(image, m, (self.size, self.size), flags=cv2.INTER_AREA)
        if crop.ndim == 2:
            crop = np.repeat(crop[..., None], 3, axis=2)
        batch = np.stack([crop, crop[:, ::-1]]).astype(np.float32) / 255.0
        out = self.session.run(None, {self.input_name: batch.transpose(0, 3, 1, 2)})[0]
        pts = out.reshape(2, 68, 2) * self.size
        mirrored = pts[1][MIRROR_68]
        mirrored[:, 0] = self.size - 1 - mirrored[:, 0]
        mean = (pts[0] + mirrored) / 2
        return mean / scale + np.array([x0, y0], np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``(68, 2)`` (x, y) landmarks of the face filling ``image`` (uint8 gray or RGB)."""
        h, w = image.shape[:2]
        side = float(max(h, w))
        first = self._predict(image, ((w - side) / 2, (h - side) / 2, side))
        lo, hi = first.min(0), first.max(0)
        side = float((hi - lo).max() * 1.2)
        centre = (lo + hi) / 2
        return self._predict(image, (centre[0] - side / 2, centre[1] - side / 2, side)).astype(
            np.float32
        )
