"""Occluded query sets materialised to disk once, with a manifest (paper Sec. 3, 4.1).

:class:`OccludedFaces` turns any face set (LFW folder, CALFW, AgeDB, synthetic, ...) into
occluded copies (``mask``, ``sunglasses`` or ``crop``, see :mod:`faceemd.data.occlusion`) under
``out_root/<occlusion>-<key>/``, where the key hashes the source set's fingerprint, the
occlusion and the seed. Each image's occluder is drawn from a generator seeded by
``(seed, crc32(relative path))``, so an image gets the same pixels whatever the order or the
resumption point. ``manifest.jsonl`` gets one line per image as it is written (``ok`` with the
occluded image's landmarks, or ``skipped`` with the reason), so a killed run resumes where it
stopped and every later job, e.g. of a sweep, reuses the files without regenerating them.

Landmarks come from the source set's annotations, else from an ONNX landmark model
(``landmark_model``); an image without usable landmarks is an error naming it, or a skipped
entry in the manifest with ``on_bad_image='skip'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path

import numpy as np

from faceemd.data.folders import BadImageError, _FileFaces
from faceemd.data.manifest import Manifest, landmark_list, write_image
from faceemd.data.occlusion import OCCLUSIONS, apply_occlusion

__all__ = ["OccludedFaces"]

log = logging.getLogger(__name__)
_VERSION = 1


class NoFaceError(ValueError):
    """No usable landmarks for an image that an overlay needs."""


def _plausible(lmk: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Detected points look like a face: mostly inside the image, eyes apart."""
    h, w = shape[:2]
    inside = ((lmk[:, 0] >= 0) & (lmk[:, 0] < w) & (lmk[:, 1] >= 0) & (lmk[:, 1] < h)).mean()
    eyes = float(np.linalg.norm(lmk[42:48].mean(0) - lmk[36:42].mean(0)))
    return bool(inside >= 0.8 and eyes >= 0.1 * w)


class OccludedFaces(_FileFaces):
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
        recipe = {"source": source.fingerprint(), "occlusion": occlusion, "seed": seed, "v": 1}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(out_root) / f"{occlusion}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
        self.source = source
        self.occlusion = occlusion
        self.seed = seed
        self.landmark_model = landmark_model
        self._landmarker = None
        self._source_names = list(source.label_names())
        super().__init__(folder, on_bad_image, landmarks=str(folder / "landmarks68.tsv"))
        self._materialise()

    def _relpath(self, index: int) -> str:
        """The occluded copy's path inside this set's folder, derived from the source's: the
        same relative path for a plain relative one; for an absolute path or one that climbs
        out (``..``) a name under ``_outside/`` with a hash of the source path, so no written
        file can land outside the folder or on a source image."""
        files = getattr(self.source, "files", None)
        if files is None:
            return f"{self._source_names[index]}/{index:06d}.png"
        src = Path(files[index])
        if src.is_absolute() or ".." in src.parts or not src.parts:
            digest = hashlib.sha256(str(src).encode()).hexdigest()[:16]
            return f"_outside/{digest}-{src.stem}.png"
        return str(src.with_suffix(".png"))

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
            from faceemd.data.landmarks import OnnxLandmarker

            self._landmarker = OnnxLandmarker(self.landmark_model)
        found = self._landmarker(image)
        if not _plausible(found, image.shape):
            raise NoFaceError(f"{rel}: no face detected (landmarks implausible)")
        return found

    def _one(self, index: int, rel: str) -> dict:
        label = self._source_names[index]
        item = self.source[index]
        if item is None:
            raise BadImageError(f"source image {index} ({rel}) is unreadable")
        image, _, lmk = item
        if self.occlusion != "crop":
            lmk = self._landmarks_for(image, lmk, rel)
        rng = np.random.default_rng([self.seed, zlib.crc32(rel.encode())])
        out, new_lmk = apply_occlusion(image, lmk, self.occlusion, rng)
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root.resolve()):  # e.g. a symlinked folder inside
            raise ValueError(f"refusing to write {target}: outside {self.root}")
        write_image(target, out)
        entry = {"rel": rel, "label": label, "status": "ok", "source_index": index}
        if new_lmk is not None and np.isfinite(new_lmk).all():
            entry["landmarks"] = landmark_list(new_lmk)
        return entry

    def _materialise(self) -> None:
        made = skipped = 0
        with Manifest(self.root) as manifest:
            for index in range(len(self.source)):
                rel = self._relpath(index)
                if rel in manifest.done:
                    continue
                try:
                    entry = self._one(index, rel)
                    made += 1
                except (BadImageError, NoFaceError) as err:
                    if self.on_bad_image != "skip":
                        raise
                    entry = {
                        "rel": rel,
                        "status": "skipped",
                        "reason": str(err),
                        "source_index": index,
                    }
                    skipped += 1
                manifest.record(entry)
        self.manifest_path = manifest.path
        done = manifest.done
        order = sorted(done.values(), key=lambda e: e["source_index"])
        ok = [e for e in order if e["status"] == "ok"]
        self.skip_list = [(e["rel"], e["reason"]) for e in order if e["status"] == "skipped"]
        self.files = [e["rel"] for e in ok]
        self.labels = [e["label"] for e in ok]
        self.landmarks = {
            e["rel"]: np.asarray(e["landmarks"], np.float32).reshape(-1, 2)
            for e in ok
            if "landmarks" in e
        }
        if not self.files:
            raise ValueError(f"no occluded image could be made from the source set ({self.root})")
        log.info(
            "occluded set %s: %d images (%d new, %d reused, %d skipped in total)",
            self.root,
            len(self.files),
            made,
            len(done) - made - skipped,
            len(self.skip_list),
        )
