"""Procedurally generated faces: the embedded default data set (no download, no account).

Each identity has its own geometry (face shape, eye spacing and size, brow shape, nose and mouth
proportions, hairline) and texture (skin tone, a low-frequency skin pattern, moles); each image
of it adds pose (rotation, scale, shift), lighting (direction, contrast), expression (mouth and
eyes) and noise. Images are 128x128 grayscale in the aligned-face framing, with 68 landmarks in
iBUG-300W order, so the same occlusion and LMK code runs on them as on real faces.

Everything is a pure function of ``(seed, identity, image number)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from faceemd.data.align import align_face, five_points, resolve_template
from faceemd.data.occlusion import apply_occlusion

__all__ = ["Identity", "render_face", "sample_identity", "SyntheticFaces"]

SIZE = 128


@dataclass(frozen=True)
class Identity:
    """Geometry and texture of one synthetic person (pixels in the 128x128 canonical frame)."""

    face_center: tuple[float, float]
    face_radii: tuple[float, float]
    eye_y: float
    eye_gap: float
    eye_radii: tuple[float, float]
    brow_lift: float
    brow_arch: float
    brow_thick: int
    nose_len: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    lip_thick: float
    hairline: float
    skin: float
    hair: float
    pattern: np.ndarray  # (8, 8) multiplicative skin pattern
    moles: np.ndarray  # (M, 2) offsets from the face centre, in face radii


def sample_identity(seed: int, identity: int) -> Identity:
    """Draw identity ``identity`` of data set ``seed``."""
    r = np.random.default_rng([seed, identity, 0])
    return Identity(
        face_center=(64.0 + r.uniform(-3, 3), 66.0 + r.uniform(-3, 3)),
        face_radii=(r.uniform(34, 46), r.uniform(44, 56)),
        eye_y=r.uniform(50, 60),
        eye_gap=r.uniform(28, 42),
        eye_radii=(r.uniform(6, 10), r.uniform(2.5, 5)),
        brow_lift=r.uniform(7, 14),
        brow_arch=r.uniform(-3, 5),
        brow_thick=int(r.integers(2, 6)),
        nose_len=r.uniform(14, 26),
        nose_width=r.uniform(7, 15),
        mouth_y=r.uniform(92, 104),
        mouth_width=r.uniform(18, 34),
        lip_thick=r.uniform(2, 6),
        hairline=r.uniform(0.55, 0.95),
        skin=r.uniform(110, 210),
        hair=r.uniform(10, 90),
        pattern=r.uniform(0.75, 1.25, size=(8, 8)),
        moles=r.uniform(-0.7, 0.7, size=(int(r.integers(0, 4)), 2)),
    )


def _landmarks(p: Identity, eye_open: float, mouth_open: float) -> np.ndarray:
    """68 canonical landmarks (x, y) in iBUG-300W order."""
    cx, cy = p.face_center
    rx, ry = p.face_radii
    pts = np.zeros((68, 2))
    t = np.pi - 0.15 - np.arange(17) * (np.pi - 0.3) / 16
    pts[0:17] = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
    for side, (b0, e0) in enumerate([(17, 36), (22, 42)]):
        ex = cx + (-0.5 if side == 0 else 0.5) * p.eye_gap
        bx = ex + np.linspace(-1, 1, 5) * p.eye_radii[0] * 1.4
        by = p.eye_y - p.brow_lift - p.brow_arch * (1 - np.linspace(-1, 1, 5) ** 2)
        pts[b0 : b0 + 5] = np.stack([bx, by], 1)
        a = np.array([np.pi, 0.75 * np.pi, 0.25 * np.pi, 0.0, -0.25 * np.pi, -0.75 * np.pi])
        pts[e0 : e0 + 6] = np.stack(
            [ex + p.eye_radii[0] * np.cos(a), p.eye_y - p.eye_radii[1] * eye_open * np.sin(a)], 1
        )
    top = p.eye_y
    pts[27:31] = np.stack([np.full(4, cx), top + np.linspace(0, p.nose_len, 4)], 1)
    pts[31:36] = np.stack(
        [cx + np.linspace(-1, 1, 5) * p.nose_width / 2, np.full(5, top + p.nose_len + 3)], 1
    )
    mw, my, lt = p.mouth_width / 2, p.mouth_y, p.lip_thick
    a = np.linspace(np.pi, -np.pi, 13)[:12]
    pts[48:60] = np.stack([cx + mw * np.cos(a), my - (lt + mouth_open) * np.sin(a)], 1)
    a = np.linspace(np.pi, -np.pi, 9)[:8]
    pts[60:68] = np.stack([cx + 0.7 * mw * np.cos(a), my - mouth_open * 0.8 * np.sin(a)], 1)
    return pts


def render_face(p: Identity, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image of identity ``p``: ``(image (128, 128) uint8, landmarks (68, 2))``."""
    eye_open = rng.uniform(0.6, 1.1)
    mouth_open = rng.uniform(0.0, 4.0)
    lmk = _landmarks(p, eye_open, mouth_open)
    cx, cy = p.face_center
    rx, ry = p.face_radii
    bg = rng.uniform(30, 220)
    img = np.full((SIZE, SIZE), bg, np.float32)
    # Hair: an ellipse behind the face, its top at the identity's hairline.
    cv2.ellipse(
        img,
        (int(cx), int(cy - ry * 0.15)),
        (int(rx * 1.15), int(ry * 1.1)),
        0,
        0,
        360,
        p.hair,
        -1,
        cv2.LINE_AA,
    )
    face = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(face, (int(cx), int(cy)), (int(rx), int(ry)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    forehead_cut = int(cy - ry * p.hairline)
    face[: max(forehead_cut, 0)] *= 0.0
    texture = cv2.resize(p.pattern.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    img = img * (1 - face) + face * p.skin * texture
    for m in p.moles:
        cv2.circle(img, (int(cx + m[0] * rx), int(cy + m[1] * ry)), 2, p.skin * 0.4, -1)
    for e0 in (36, 42):
        eye = lmk[e0 : e0 + 6].round().astype(np.int32)
        cv2.fillPoly(img, [eye], 235.0, cv2.LINE_AA)
        c = lmk[e0 : e0 + 6].mean(0)
        cv2.circle(img, (int(c[0]), int(c[1])), max(2, int(p.eye_radii[1] * eye_open)), 25.0, -1)
    for b0 in (17, 22):
        cv2.polylines(
            img,
            [lmk[b0 : b0 + 5].round().astype(np.int32)],
            False,
            p.hair * 0.6,
            p.brow_thick,
            cv2.LINE_AA,
        )
    cv2.polylines(img, [lmk[27:31].round().astype(np.int32)], False, p.skin * 0.7, 2, cv2.LINE_AA)
    cv2.polylines(img, [lmk[31:36].round().astype(np.int32)], False, p.skin * 0.5, 2, cv2.LINE_AA)
    cv2.fillPoly(img, [lmk[48:60].round().astype(np.int32)], p.skin * 0.55, cv2.LINE_AA)
    cv2.fillPoly(img, [lmk[60:68].round().astype(np.int32)], 20.0, cv2.LINE_AA)
    # Pose: similarity warp of image and landmarks.
    angle, scale = rng.uniform(-10, 10), rng.uniform(0.93, 1.07)
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[:, 2] += rng.uniform(-4, 4, size=2)
    img = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderValue=float(bg))
    lmk = lmk @ m[:, :2].T + m[:, 2]
    # Light: a directional gradient, contrast, noise.
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0, 0.5) * (np.cos(theta) * xx + np.sin(theta) * yy)
    img = (img * light - 128) * rng.uniform(0.8, 1.2) + 128 + rng.uniform(-15, 15)
    img += rng.normal(0, rng.uniform(2, 8), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), lmk


class SyntheticFaces:
    """An identity-labelled set of synthetic faces, optionally occluded.

    num_identities x images_per_identity images; ``first_image`` offsets the image numbers so
    that a gallery (images 0..n-1) and a query set (images n..) of the same identities never
    share a picture. occlusion: one of :data:`faceemd.data.occlusion.OCCLUSIONS`.
    template: a name of :data:`faceemd.data.align.TEMPLATES`: each rendered face is aligned to
    it by its own 5 points (eye centres, nose tip, mouth corners of its 68 landmarks), as a
    detected real photo is, before the occluder is applied; None keeps the 128x128 render.
    Item ``i`` is ``(image (h, w) uint8, identity name, landmarks (68, 2))``, ``(h, w)`` the
    template's size or ``(128, 128)``.
    """

    def __init__(
        self,
        num_identities: int = 40,
        images_per_identity: int = 3,
        first_image: int = 0,
        occlusion: str = "none",
        seed: int = 0,
        template: str | None = None,
    ) -> None:
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError("num_identities and images_per_identity must be >= 1")
        self.template = resolve_template(template)
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.first_image = first_image
        self.occlusion = occlusion
        self.seed = seed
        self._identities = [sample_identity(seed, i) for i in range(num_identities)]
        # the seed is part of the name: sets drawn with other seeds are other people
        self.names = [f"synth{seed}_{i:04d}" for i in range(num_identities)]

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def fingerprint(self) -> dict:
        """What determines the images (the feature-cache key of this set)."""
        return {
            "type": "SyntheticFaces",
            "num_identities": self.num_identities,
            "images_per_identity": self.images_per_identity,
            "first_image": self.first_image,
            "occlusion": self.occlusion,
            "seed": self.seed,
            "template": self.template,
        }

    def label_names(self) -> list[str]:
        """Identity name of every item, without rendering."""
        return [self.names[i // self.images_per_identity] for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, np.ndarray]:
        ident, k = divmod(index, self.images_per_identity)
        image_no = self.first_image + k
        rng = np.random.default_rng([self.seed, ident, image_no + 1])
        img, lmk = render_face(self._identities[ident], rng)
        if self.template is not None:
            img, m = align_face(img, five_points(lmk), self.template)
            lmk = lmk @ m[:, :2].T + m[:, 2]
        occ_rng = np.random.default_rng([self.seed, ident, image_no + 1, 7])
        img, lmk = apply_occlusion(img, lmk, self.occlusion, occ_rng)
        return img, self.names[ident], lmk.astype(np.float32)
