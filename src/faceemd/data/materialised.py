"""Face sets derived image by image from a source set and written to disk once, with a manifest.

Occluded query sets (:mod:`faceemd.data.occluded`) and detected-and-aligned photos
(:mod:`faceemd.data.aligned`) turn every image of a source face set into a new image under
``out_root/<kind>-<key>/``, where the key hashes the recipe (what the subclass says changes the
output). ``manifest.jsonl`` gets one line per image as it is written (``ok`` with the new
image's landmarks, or ``skipped`` with the reason) and the source file's size and time, so a
killed run resumes where it stopped, every later job (e.g. of a sweep) reuses the files, and
an edited source image is redone. Sets whose recipes agree share one folder and manifest (a
set of frontal and one of profile photos of the same root): each reads its own images from it.
Runs started together on one recipe share the work: the folder's lock lets one make the
images while the others wait, then reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from faceemd.console import stage_progress
from faceemd.data.errors import BadImageError, NoFaceError, skip_cause
from faceemd.data.faceset import FileFaces
from faceemd.storage.atomic import atomic_write_text
from faceemd.storage.manifest import Manifest, landmark_list, write_image

__all__ = ["MaterialisedFaces", "source_stamps"]

log = logging.getLogger(__name__)


def source_stamps(source) -> list[str] | None:
    """``size:mtime_ns`` of each of ``source``'s files (:meth:`FileFaces.stamps`), or None for
    a generated source: what a made set's manifest checks each entry against."""
    return source.stamps() if isinstance(source, FileFaces) else None


@functools.lru_cache(maxsize=1 << 20)
def _png_relpath(source: str) -> str:
    """See :meth:`MaterialisedFaces._relpath` (memoised: every job of a sweep maps every file)."""
    src = Path(source)
    if src.is_absolute() or ".." in src.parts or not src.parts:
        digest = hashlib.sha256(str(src).encode()).hexdigest()[:16]
        return f"_outside/{digest}-{src.stem}.png"
    return str(src.with_suffix(".png"))


@contextmanager
def _exclusive(folder: Path):
    """Hold ``folder``'s lock file while the set is made or checked: a second run on the same
    recipe waits (saying so), then finds every image done and makes none, so the images are
    written once and the manifest keeps one line per image."""
    lock = FileLock(folder / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another run is making %s; waiting for it to finish", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _distinct(rels: list[str], files: list[str] | None) -> list[str]:
    """Output paths with the clashes resolved: photos that differ only in their suffix
    (``a.jpg`` and ``a.png``) would both become ``a.png``, so each of a clashing group keeps
    its own suffix in its name (``a.jpg.png``, ``a.png.png``); the others are unchanged."""
    counts = Counter(rels)
    if files is None or all(c == 1 for c in counts.values()):
        return rels
    return [
        rel if counts[rel] == 1 else _png_relpath(f"{src}.png")
        for rel, src in zip(rels, files, strict=True)
    ]


class MaterialisedFaces(FileFaces):
    """Base of the file-backed sets made from ``source``; subclasses implement :meth:`make`.

    source: a face set whose items are ``(image, name, landmarks)``; recipe: JSON-able dict
    that keys the output folder; source_stamps: the source's :meth:`stamps` if the subclass
    took them for its recipe (else taken here); kind: folder prefix; on_bad_image: ``error`` or ``skip``
    (unreadable source image, :class:`NoFaceError`). After construction it behaves as a
    file-backed face set over the written PNGs in source order; ``source_index[i]`` is the
    source position of item ``i``, ``skip_list`` holds ``(source file, reason)`` of the
    skipped and ``skip_causes`` counts them by :func:`faceemd.data.errors.skip_cause`.
    """

    def __init__(
        self,
        source,
        recipe: dict,
        out_root: str | Path,
        kind: str,
        on_bad_image: str,
        source_stamps: list[str] | None = None,
    ):
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(out_root) / f"{kind}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self._source_names = list(source.label_names())
        with _exclusive(folder):
            atomic_write_text(folder / "recipe.json", json.dumps(recipe, indent=2, sort_keys=True))
            super().__init__(folder, on_bad_image, landmarks=str(folder / "landmarks68.tsv"))
            self.source_index: list[int] = []
            self._materialise(source_stamps)

    # Source items handed to one make_batch call (a model-driven recipe batches its forward
    # passes; image-by-image recipes keep 1).
    batch_size = 1

    def make(
        self, index: int, image: np.ndarray, lmk: np.ndarray, rel: str
    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """``(new image, its landmarks (68, 2) or None, extra manifest fields)`` for source item
        ``index``; raises :class:`NoFaceError` when the image has no usable face."""
        raise NotImplementedError

    def make_batch(self, items: list[tuple[int, np.ndarray, np.ndarray, str]]) -> list:
        """:meth:`make` of each ``(index, image, landmarks, rel)``: its result, or the
        :class:`NoFaceError` or :class:`BadImageError` it raised (that image is skipped or the error raised, as
        ``on_bad_image`` says)."""
        out = []
        for item in items:
            try:
                out.append(self.make(*item))
            except (BadImageError, NoFaceError) as err:
                out.append(err)
        return out

    def finished(self) -> None:
        """Called once every image is made or reused (release detectors, models)."""

    def _relpath(self, index: int) -> str:
        """The new image's path inside this set's folder, derived from the source's: the
        same relative path for a plain relative one; for an absolute path or one that climbs
        out (``..``) a name under ``_outside/`` with a hash of the source path, so no written
        file can land outside the folder or on a source image."""
        files = getattr(self.source, "files", None)
        if files is None:
            return f"{self._source_names[index]}/{index:06d}.png"
        return _png_relpath(files[index])

    def source_name(self, index: int) -> str:
        """How to name source item ``index`` in messages: its file, else its position."""
        files = getattr(self.source, "files", None)
        return str(files[index]) if files is not None else f"#{index} ({self._source_names[index]})"

    def _write(self, rel: str, made: tuple[np.ndarray, np.ndarray | None, dict]) -> dict:
        """Write one made image under this set's folder; its manifest entry."""
        out, new_lmk, extra = made
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root.resolve()):  # e.g. a symlinked folder inside
            raise ValueError(f"refusing to write {target}: outside {self.root}")
        write_image(target, out)
        entry = {"rel": rel, "status": "ok", **extra}
        if new_lmk is not None and np.isfinite(new_lmk).all():
            entry["landmarks"] = landmark_list(new_lmk)
        return entry

    def _skipped(self, index: int, rel: str, err: Exception) -> dict:
        if self.on_bad_image != "skip":
            raise err
        return {
            "rel": rel,
            "status": "skipped",
            "source": self.source_name(index),
            "reason": str(err),
            "cause": skip_cause(err),
        }

    def _materialise(self, stamps: list[str] | None) -> None:
        made = skipped = 0
        files = getattr(self.source, "files", None)
        rels = _distinct([self._relpath(i) for i in range(len(self.source))], files)
        if stamps is None:
            stamps = source_stamps(self.source) or [None] * len(rels)
        with Manifest(self.root) as manifest:
            todo = [
                i
                for i, (rel, stamp) in enumerate(zip(rels, stamps, strict=True))
                if not (rel in manifest.done and manifest.done[rel].get("stamp") == stamp)
            ]
            bar = stage_progress(len(todo), f"making {self.root.name.split('-')[0]} images", "img")
            for start in range(0, len(todo), max(1, int(self.batch_size))):
                chunk, entries = todo[start : start + max(1, int(self.batch_size))], {}
                items = []
                for index in chunk:
                    try:
                        item = self.source[index]
                        if item is None:
                            raise BadImageError(
                                f"source image {self.source_name(index)} is unreadable"
                            )
                    except BadImageError as err:
                        entries[index] = self._skipped(index, rels[index], err)
                        continue
                    items.append((index, item[0], item[2], rels[index]))
                results = self.make_batch(items) if items else []
                for (index, *_), result in zip(items, results, strict=True):
                    if isinstance(result, Exception):
                        entries[index] = self._skipped(index, rels[index], result)
                    else:
                        entries[index] = self._write(rels[index], result)
                for index in chunk:  # in source order
                    entry = entries[index]
                    made += entry["status"] == "ok"
                    skipped += entry["status"] != "ok"
                    manifest.record({**entry, "stamp": stamps[index]})
                bar.update(len(chunk))
            bar.close()
            done = manifest.done
        self.finished()
        self.manifest_path = manifest.path
        self.skip_list = []
        self.skip_causes: Counter = Counter()
        for index, rel in enumerate(rels):
            entry = done[rel]
            if entry["status"] != "ok":
                self.skip_list.append((self.source_name(index), entry["reason"]))
                self.skip_causes[entry.get("cause", "no_face")] += 1  # older manifests: faces
                continue
            self.files.append(rel)
            self.labels.append(self._source_names[index])
            self.source_index.append(index)
            if "landmarks" in entry:
                self.landmarks[rel] = np.asarray(entry["landmarks"], np.float32).reshape(-1, 2)
        if not self.files:
            raise ValueError(f"no image could be made from the source set ({self.root})")
        log.info(
            "%s: %d images (%d new, %d reused), %d skipped (%d of them now)",
            self.root,
            len(self.files),
            made,
            len(self.files) - made,
            len(self.skip_list),
            skipped,
        )
