"""The base class of every set of face images kept as files (:class:`FileFaces`), and the
annotation files beside them.

A face set is a sequence of items ``(image uint8 (H, W) or (H, W, 3), identity name, landmarks
(68, 2) or NaN)``. :class:`FileFaces` holds ``root``, ``files`` (paths relative to it) and
``labels`` (identity names), decodes items on access (:func:`faceemd.data.decoding.read_image`),
reads the annotations beside the images (``landmarks68.tsv``: ``relpath<TAB>x0<TAB>y0...``, and
``landmarks5.tsv`` alignment points, the ``shared/data`` format) and gives the fingerprint that
keys the feature cache. The layout readers (:mod:`faceemd.data.layouts`), the pair sets
(:mod:`faceemd.data.pairs`) and the sets made from others (:mod:`faceemd.data.materialised`)
derive from it: a new layout only fills ``files`` and ``labels``.

An unreadable image raises :class:`faceemd.data.errors.BadImageError` naming the file, or
yields ``None`` when ``on_bad_image='skip'`` so that the loader drops it and counts it (never a
silently wrong label).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from faceemd.data.decoding import IMAGE_SUFFIXES, MAX_PIXELS, read_image
from faceemd.data.errors import BadImageError
from faceemd.storage.filememo import kept

__all__ = ["LABEL_PATTERNS", "FileFaces", "listing", "read_landmarks"]

# File-name patterns whose ``name`` group is the identity (flat layouts).
LABEL_PATTERNS = {
    "lfw": r"(?P<name>.+?)_\d{4}(?:_.*)?",  # CALFW, TALFW; MLFW adds a suffix
    "agedb": r"\d+_(?P<name>.+)_\d+_[mfMF]",
}

log = logging.getLogger(__name__)


def listing(folder: str | Path) -> tuple[list[str], list[str]]:
    """``(image file names, subfolder names)`` of ``folder``, each sorted; ``([], [])`` for a
    folder that does not exist. One ``scandir`` pass (the file type comes with the entry):
    every job of a sweep lists the 1,621 identity folders of LFW again. An entry whose type
    cannot be read (a symbolic link that loops or points nowhere) counts as a file when its
    name is an image's: reading it is then a bad image named in the message, which
    ``on_bad_image=skip`` skips, never an error that stops the whole set."""
    images, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # e.g. x.jpg -> x.jpg: "Too many levels of symbolic links"
                    is_dir = False
                if is_dir:
                    folders.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    images.append(entry.name)
    except FileNotFoundError:
        return [], []
    return sorted(images), sorted(folders)


def read_landmarks(tsv: Path) -> dict[str, np.ndarray]:
    """``relpath -> (68, 2)`` from a landmarks TSV (no header, x/y pairs after the path); a
    new dict of read-only arrays, parsed once per process while the file is unchanged."""
    return dict(kept(Path(tsv), _parse_landmarks, "landmarks"))


def _parse_landmarks(tsv: Path) -> dict[str, np.ndarray]:
    out = {}
    with open(tsv, newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row:
                continue
            values = np.asarray(row[1:], dtype=np.float32)
            if values.size % 2:
                raise ValueError(f"{tsv}:{line_no}: odd number of coordinates ({values.size})")
            values.flags.writeable = False
            out[row[0]] = values.reshape(-1, 2)
    return out


def _content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or ``missing`` when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


class FileFaces:
    """A set of face images kept as files under ``root``: ``files`` (relative paths) and
    ``labels`` (identity names), filled by the subclass; items decoded on access.

    on_bad_image: ``'error'`` (raise :class:`BadImageError`) or ``'skip'`` (the item is None).
    landmarks: a 68-point TSV (default: ``root/landmarks68.tsv`` when it exists).
    max_pixels: images larger than this are bad images (checked before decoding)."""

    def __init__(
        self,
        root: str | Path,
        on_bad_image: str,
        landmarks: str | None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.on_bad_image = on_bad_image
        self.max_pixels = int(max_pixels)
        tsv = self.root / "landmarks68.tsv" if landmarks is None else Path(landmarks)
        self.landmarks: dict[str, np.ndarray] = read_landmarks(tsv) if tsv.is_file() else {}
        self.files: list[str] = []
        self.labels: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def label_names(self) -> list[str]:
        return list(self.labels)

    def summary(self) -> dict[str, int]:
        """Identities, images and singleton identities (one image: never a relevant match
        for itself)."""
        counts = Counter(self.labels)
        return {
            "images": len(self.files),
            "identities": len(counts),
            "singletons": sum(1 for c in counts.values() if c == 1),
        }

    def keep_first(self, n: int) -> None:
        """Keep only the first ``n`` images (a quick subset; the fingerprint follows)."""
        if n < 1:
            raise ValueError(f"limit_queries must be >= 1, got {n}")
        self.files, self.labels = self.files[:n], self.labels[:n]
        if hasattr(self, "source_index"):  # a set made image by image from a source
            self.source_index = self.source_index[:n]

    def _keep_identities(self, min_images: int) -> None:
        """Drop identities with fewer than ``min_images`` images."""
        counts = Counter(self.labels)
        kept = [
            (f, lb)
            for f, lb in zip(self.files, self.labels, strict=True)
            if counts[lb] >= min_images
        ]
        self.files = [f for f, _ in kept]
        self.labels = [lb for _, lb in kept]

    def fingerprint(self, content_hash: bool = False, stamps: list[str] | None = None) -> dict:
        """Manifest digest (relative path, label, size, mtime of every file, landmarks) that
        keys the feature cache: editing, adding or removing an image changes it.
        content_hash: use each file's SHA-256 instead of its size and time (reads every file;
        notices an image replaced by one of the same size and time). stamps: :meth:`stamps`
        when the caller has just taken them."""
        if content_hash:
            stamps = [_content_digest(self.root / rel) for rel in self.files]
        elif stamps is None:
            stamps = self.stamps()
        h = hashlib.sha256()  # one update per part: a sweep's every job fingerprints its sets
        h.update(
            "".join(
                f"{rel}\t{label}\t{stamp}\n"
                for rel, label, stamp in zip(self.files, self.labels, stamps, strict=True)
            ).encode()
        )
        h.update(
            b"".join(
                rel.encode() + np.ascontiguousarray(self.landmarks[rel], np.float32).tobytes()
                for rel in sorted(self.landmarks)
            )
        )
        return {
            "type": type(self).__name__,
            "root": str(self.root.resolve()),
            "manifest_sha256": h.hexdigest(),
            "on_bad_image": self.on_bad_image,
            "content_hash": content_hash,
        }

    def stamps(self) -> list[str]:
        """``size:mtime_ns`` of every file, in order (``missing`` where it cannot be stat'ed):
        what :meth:`fingerprint` and sets made from this one check for edits."""
        root = str(self.root)  # os.path on strings: a sweep's every job stats every file
        out = []
        for rel in self.files:
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError:
                out.append("missing")
                continue
            out.append(f"{st.st_size}:{st.st_mtime_ns}")
        return out

    def points5(self, index: int) -> np.ndarray | None:
        """The annotated 5 alignment points ``(5, 2)`` of item ``index`` (``landmarks5.tsv``
        beside the images, the ``shared/data`` format), or None when there are none."""
        if not hasattr(self, "_points5"):
            tsv = self.root / "landmarks5.tsv"
            self._points5 = read_landmarks(tsv) if tsv.is_file() else {}
        found = self._points5.get(self.files[index])
        return None if found is None else found.astype(np.float64)

    def __getitem__(self, index: int):
        rel = self.files[index]
        try:
            image = read_image(self.root / rel, self.max_pixels)
        except BadImageError as err:
            if self.on_bad_image == "skip":
                log.warning("skipping a bad image: %s", err)
                return None
            raise
        lmk = self.landmarks.get(rel)
        if lmk is None:
            lmk = np.full((68, 2), np.nan, np.float32)
        return image, self.labels[index], lmk
