"""5-point similarity alignment to the standard face templates, as a library and a command.

``python -m faceemd.data.align SRC DST --template sphereface_112x96`` turns a folder of
unaligned faces (LFW layout ``<Name>/<file>``) into an aligned folder of the same layout,
with ``landmarks68.tsv`` mapped into the aligned frame when 68 points are known and a
``manifest.jsonl`` (one line per image: ``ok`` or ``skipped`` with the reason) that lets a
rerun resume instead of redoing finished images. Points come from ``SRC/landmarks5.tsv``,
else from ``SRC/landmarks68.tsv``, else from an ONNX 68-point model (``--landmark-model``).

The transform is the least-squares similarity (rotation, uniform scale, translation) from the
five points (eye centres, nose tip, mouth corners) to the template (Umeyama, 1991). When it
shrinks the face by more than 10%, the source is first downscaled with area interpolation,
then warped bilinearly (no aliasing); pixels outside the source are black.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from faceemd.data.decoding import IMAGE_SUFFIXES, read_image
from faceemd.data.errors import BadImageError
from faceemd.data.faceset import read_landmarks
from faceemd.storage.manifest import Manifest, landmark_list, write_image

__all__ = [
    "TEMPLATES",
    "Template",
    "align_face",
    "align_folder",
    "alignment_matrix",
    "five_points",
    "resolve_template",
    "template_points",
    "umeyama",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    """points: 5 reference (x, y) in a ``crop`` (h, w) frame, resized to ``size`` (h, w)."""

    points: tuple[tuple[float, float], ...]
    crop: tuple[int, int]
    size: tuple[int, int]


_INSIGHTFACE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                    (41.5493, 92.3655), (70.7299, 92.2041))  # fmt: skip
TEMPLATES = {
    # DeepFace-EMD's ArcFace input: a 160x160 crop resized to 128x128 (not left-right symmetric)
    "arcface_128": Template(
        (
            (61.4356, 54.6963),
            (118.5318, 54.6963),
            (93.5252, 90.7366),
            (68.5493, 122.3655),
            (110.7299, 122.3641),
        ),
        (160, 160),
        (128, 128),
    ),  # fmt: skip
    # SphereFace / CosFace / MobileFaceNet
    "sphereface_112x96": Template(
        (
            (30.2946, 51.6963),
            (65.5318, 51.5014),
            (48.0252, 71.7366),
            (33.5493, 92.3655),
            (62.7299, 92.2041),
        ),
        (112, 96),
        (112, 96),
    ),  # fmt: skip
    # ArcFace / insightface 112x112 (SFace and most ONNX face models): the 112x96 SphereFace
    # template shifted 8 px right
    "arcface_112": Template(_INSIGHTFACE_112, (112, 112), (112, 112)),
    # FaceNet 160x160: the insightface 112x112 template scaled to 160
    "facenet_160": Template(
        tuple((x * 160 / 112, y * 160 / 112) for x, y in _INSIGHTFACE_112), (160, 160), (160, 160)
    ),
}


def resolve_template(value) -> str | None:
    """A template name for ``value``: None, a name of :data:`TEMPLATES`, or a user's own
    template as a mapping ``{points: [[x, y] x 5], size: [h, w]}`` (points in the order
    image-left eye, image-right eye, nose tip, image-left and image-right mouth corner, in
    pixels of the ``size`` output; optional ``crop: [h, w]`` when the points are given in a
    larger frame that is then resized to ``size``). A mapping is added to :data:`TEMPLATES`
    under ``custom_<digest of its values>`` (the same template always gets the same name, so it
    keys caches and aligned sets like a built-in one). Anything else is a ``ValueError``."""
    if value is None or isinstance(value, str):
        if value is not None and value not in TEMPLATES:
            raise ValueError(
                f"unknown template {value!r}; choose from {sorted(TEMPLATES)} or give your own "
                "as {points: [[x, y] x 5], size: [h, w]}"
            )
        return value
    try:
        spec = dict(value)
        points = tuple((float(x), float(y)) for x, y in spec["points"])
        size = tuple(int(v) for v in spec["size"])
        crop = tuple(int(v) for v in spec.get("crop") or size)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"a template is a name or {{points: [[x, y] x 5], size: [h, w]}}, got {value!r}"
        ) from err
    if len(points) != 5 or len(size) != 2 or len(crop) != 2 or min(*size, *crop) <= 0:
        raise ValueError(
            f"a template needs 5 (x, y) points and a positive size [h, w]; got {len(points)} "
            f"points, size {list(size)}"
        )
    digest = hashlib.sha256(repr((points, crop, size)).encode()).hexdigest()[:10]
    name = f"custom_{digest}"
    TEMPLATES.setdefault(name, Template(points, crop, size))
    return name


def template_points(template: str | Template) -> np.ndarray:
    """The 5 reference points ``(5, 2)`` of a template in its output (``size``) frame."""
    t = TEMPLATES[template] if isinstance(template, str) else template
    (ch, cw), (h, w) = t.crop, t.size
    return np.asarray(t.points, np.float64) * np.array([w / cw, h / ch])


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``2x3`` matrix mapping points ``src (N, 2)`` onto ``dst``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var = (s**2).sum() / len(src)
    if var <= 0:
        raise ValueError("the 5 source points coincide: cannot align")
    scale = np.trace(np.diag(sig) @ sign) / var
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def five_points(lmk68: np.ndarray) -> np.ndarray:
    """The 5 alignment points from 68 iBUG points: eye centres (36-41, 42-47), nose tip (30),
    mouth corners (48, 54)."""
    return np.stack(
        [lmk68[36:42].mean(0), lmk68[42:48].mean(0), lmk68[30], lmk68[48], lmk68[54]]
    ).astype(np.float64)


def alignment_matrix(points5: np.ndarray, template: str | Template) -> np.ndarray:
    """The ``2x3`` similarity mapping source pixels to the aligned image's pixels (the
    template's output size) for a face with 5 points ``points5 (5, 2)``."""
    t = TEMPLATES[template] if isinstance(template, str) else template
    m = umeyama(points5, np.asarray(t.points))
    (ch, cw), (h, w) = t.crop, t.size
    out_scale = np.array([[w / cw, 0, 0], [0, h / ch, 0], [0, 0, 1]])
    return (out_scale @ np.vstack([m, [0, 0, 1]]))[:2]


def align_face(
    image: np.ndarray, points5: np.ndarray, template: str | Template = "sphereface_112x96"
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` so its 5 points meet the template; returns ``(aligned, M)`` where ``M``
    (2x3) maps source pixels to aligned pixels."""
    t = TEMPLATES[template] if isinstance(template, str) else template
    h, w = t.size
    full = np.vstack([alignment_matrix(points5, t), [0, 0, 1]])
    src = image
    pre = np.eye(3)
    scale = float(np.sqrt(abs(np.linalg.det(full[:2, :2]))))
    if scale < 0.9:  # downscale first (area), then warp the rest of the way
        sh, sw = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
        src = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        pre = np.diag([image.shape[1] / sw, image.shape[0] / sh, 1.0])
    warp = (full @ pre)[:2]
    aligned = cv2.warpAffine(src, warp, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    return aligned, full[:2]


def _image_points(src_root: Path, landmark_model: str | None):
    """``relpath -> (points5, lmk68 or None)`` source, from TSVs or a detector."""
    five = (
        read_landmarks(src_root / "landmarks5.tsv")
        if (src_root / "landmarks5.tsv").is_file()
        else {}
    )
    l68 = (
        read_landmarks(src_root / "landmarks68.tsv")
        if (src_root / "landmarks68.tsv").is_file()
        else {}
    )
    detector = None

    def points(rel: str, image: np.ndarray):
        nonlocal detector
        lmk = l68.get(rel)
        if rel in five:
            return five[rel].astype(np.float64), lmk
        if lmk is not None:
            return five_points(lmk), lmk
        if landmark_model is None:
            raise BadImageError(
                f"{rel}: no entry in landmarks5.tsv/landmarks68.tsv and no --landmark-model"
            )
        if detector is None:
            from faceemd.data.landmarks import OnnxLandmarker

            detector = OnnxLandmarker(landmark_model)
        lmk = detector(image)
        return five_points(lmk), lmk

    return points


def align_folder(
    src: str | Path,
    dst: str | Path,
    template: str = "sphereface_112x96",
    landmark_model: str | None = None,
    on_bad_image: str = "error",
) -> dict[str, int]:
    """Align every ``<Name>/<file>`` image of ``src`` into ``dst``; resumable.

    Returns counts ``{"aligned", "reused", "skipped"}``. Grayscale stays grayscale.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    s_abs, d_abs = src.resolve(), dst.resolve()
    if d_abs == s_abs or d_abs.is_relative_to(s_abs) or s_abs.is_relative_to(d_abs):
        raise ValueError(
            f"destination {dst} overlaps the source {src}: aligned images would overwrite the "
            "originals; choose a folder outside the source"
        )
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    files = sorted(
        str(p.relative_to(src)) for p in src.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(f"no <Name>/<image> files under {src}")
    dst.mkdir(parents=True, exist_ok=True)
    points_of = _image_points(src, landmark_model)
    counts = {"aligned": 0, "reused": 0, "skipped": 0}
    with Manifest(dst, match={"template": template}) as manifest:
        for rel in files:
            if rel in manifest.done:
                counts["reused" if manifest.done[rel]["status"] == "ok" else "skipped"] += 1
                continue
            try:
                image = read_image(src / rel)
                pts5, lmk = points_of(rel, image)
                aligned, m = align_face(image, pts5, template)
            except (BadImageError, ValueError) as err:
                if on_bad_image != "skip":
                    raise
                entry = {"rel": rel, "status": "skipped", "reason": str(err)}
                counts["skipped"] += 1
            else:
                write_image(dst / rel, aligned)
                entry = {"rel": rel, "status": "ok"}
                if lmk is not None:
                    entry["landmarks"] = landmark_list(np.asarray(lmk) @ m[:, :2].T + m[:, 2])
                counts["aligned"] += 1
            manifest.record(entry)
    done = manifest.done
    with open(dst / "landmarks68.tsv", "w") as tsv:
        for rel in files:
            e = done.get(rel, {})
            if e.get("status") == "ok" and "landmarks" in e:
                tsv.write("\t".join([rel] + [f"{v:.2f}" for v in e["landmarks"]]) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m faceemd.data.align", description="5-point face alignment of a folder"
    )
    parser.add_argument("src", help="unaligned faces, <Name>/<file> layout")
    parser.add_argument("dst", help="output folder (same layout)")
    parser.add_argument("--template", default="sphereface_112x96", choices=sorted(TEMPLATES))
    parser.add_argument("--landmark-model", default=None, help="ONNX 68-point model")
    parser.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    args = parser.parse_args(argv)
    try:
        counts = align_folder(
            args.src, args.dst, args.template, args.landmark_model, args.on_bad_image
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
