"""Verification pair lists in their distributed layouts, and the face set of the images they name.

Layouts (``shared/docs/DATASETS.md``):

- ``lfw``: LFW ``pairs.txt``: header ``<folds> <n>``, then per fold ``n`` lines ``name i j``
  (same person) and ``n`` lines ``name1 i name2 j`` (different); images
  ``<name>/<name>_<i:04d>.jpg``.
- ``triplets``: ``img1 img2 label`` lines, label 1 (or any non-zero) for the same person
  (MLFW ``pairs.txt``; AgeDB-30 lists written out this way); folds are equal consecutive
  blocks.
- ``calfw``: CALFW ``pairs_CALFW.txt``: two lines ``img label`` per pair; same person when the
  labels are non-zero; folds are equal consecutive blocks.
- ``cfp_ff`` / ``cfp_fp``: CFP ``Protocol/Split/{FF,FP}/<01..10>/{same,diff}.txt`` lines
  ``i,j`` (1-based) indexing ``Pair_list_F.txt`` (and ``Pair_list_P.txt`` for the second
  image of FP); the fold is the split folder.

Image names in ``triplets`` and ``calfw`` files may omit the extension (matched by stem in a
flat folder). A missing image, a malformed line or a fold count that does not divide the pairs
is an error naming the file and line.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceemd.data.decoding import IMAGE_SUFFIXES, MAX_PIXELS
from faceemd.data.errors import BadImageError
from faceemd.data.faceset import LABEL_PATTERNS, FileFaces

__all__ = ["LAYOUTS", "PairFaces", "Pairs", "images_in_pairs", "pairs_of", "read_text_lines"]

log = logging.getLogger(__name__)

LAYOUTS = ("lfw", "triplets", "calfw", "cfp_ff", "cfp_fp")


@dataclass(frozen=True)
class Pairs:
    """``N`` verification pairs over the positions of a face set: ``first``, ``second`` (N,)
    int64 positions; ``same`` (N,) bool; ``fold`` (N,) int64 in ``0..folds-1``; ``dropped``:
    how many listed pairs lost an image (no face, unreadable) and are left out."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.first)

    def select(self, keep: np.ndarray) -> Pairs:
        """The pairs where ``keep (N,)`` is true (``dropped`` unchanged)."""
        return Pairs(self.first[keep], self.second[keep], self.same[keep], self.fold[keep],
                     self.dropped)  # fmt: skip


class _Reader:
    """Collects ``(rel_a, rel_b, same)`` rows, naming images by relative path under ``root``."""

    def __init__(self, root: Path, path: Path) -> None:
        self.root, self.path = root, path
        self.rows: list[tuple[str, str, bool]] = []
        self.lines: list[int] = []
        self._stems: dict[str, str] | None = None

    def error(self, line_no: int, what: str) -> ValueError:
        return ValueError(f"{self.path}:{line_no}: {what}")

    def image(self, token: str, line_no: int) -> str:
        """Relative path of ``token`` under ``root``, normalised (an absolute path inside
        ``root``, ``./x`` and ``x`` name one image): as given, else by stem in the root folder."""
        if os.path.isabs(token):
            inside = os.path.relpath(os.path.normpath(token), os.path.normpath(self.root))
            if not inside.startswith(".."):
                token = inside
        token = os.path.normpath(token)
        if (self.root / token).is_file():
            return token
        if Path(token).suffix.lower() not in IMAGE_SUFFIXES:
            if self._stems is None:
                self._stems = {
                    p.stem: p.name
                    for p in self.root.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES
                }
            if token in self._stems:
                return self._stems[token]
        raise FileNotFoundError(f"{self.path}:{line_no} names {token}, which is not in {self.root}")

    def add(self, a: str, b: str, same: bool, line_no: int) -> None:
        self.rows.append((a, b, same))
        self.lines.append(line_no)


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is a ``ValueError`` naming the
    file, line and byte offset (never the file's content)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line_no}: byte {err.start} (0x{data[err.start]:02x}) is not UTF-8 text; "
            "save the file as UTF-8"
        ) from None


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {path}")
    out = []
    for line_no, line in enumerate(read_text_lines(path), 1):
        if line.strip():
            out.append((line_no, re.split(r"[\s,]+", line.strip())))
    if not out:
        raise ValueError(f"pair file {path} lists no pair")
    return out


def _int(token: str, reader: _Reader, line_no: int) -> int:
    try:
        return int(token)
    except ValueError:
        raise reader.error(line_no, f"{token!r} is not an image number") from None


def _read_lfw(reader: _Reader) -> int:
    lines = _lines(reader.path)
    (line_no, header), body = lines[0], lines[1:]
    if len(header) != 2 or not all(t.isdigit() for t in header):
        raise reader.error(
            line_no, f"expected the header '<folds> <pairs per class>', got {header}"
        )
    folds, n = int(header[0]), int(header[1])
    if len(body) != 2 * folds * n:
        raise reader.error(
            line_no, f"header announces {folds} folds x {2 * n} pairs, the file has {len(body)}"
        )

    def rel(name: str, number: str, line_no: int) -> str:
        return reader.image(f"{name}/{name}_{_int(number, reader, line_no):04d}.jpg", line_no)

    for line_no, t in body:
        if len(t) == 3:
            reader.add(rel(t[0], t[1], line_no), rel(t[0], t[2], line_no), True, line_no)
        elif len(t) == 4:
            reader.add(rel(t[0], t[1], line_no), rel(t[2], t[3], line_no), False, line_no)
        else:
            raise reader.error(line_no, f"expected 'name i j' or 'name1 i name2 j', got {t}")
    return folds


def _read_triplets(reader: _Reader) -> None:
    for line_no, t in _lines(reader.path):
        if len(t) != 3:
            raise reader.error(line_no, f"expected 'img1 img2 label', got {t}")
        label = _int(t[2], reader, line_no)
        if label not in (1, 0, -1):
            raise reader.error(line_no, f"label {label}: use 1 (same person) or 0 / -1 (not)")
        reader.add(reader.image(t[0], line_no), reader.image(t[1], line_no), label == 1, line_no)


def _read_calfw(reader: _Reader) -> None:
    lines = _lines(reader.path)
    if len(lines) % 2:
        raise reader.error(lines[-1][0], "odd number of lines: pairs take two lines each")
    for (n1, t1), (n2, t2) in zip(lines[::2], lines[1::2], strict=True):
        for line_no, t in ((n1, t1), (n2, t2)):
            if len(t) != 2:
                raise reader.error(line_no, f"expected 'img label', got {t}")
        labels = [(_int(t[1], reader, n), n) for n, t in ((n1, t1), (n2, t2))]
        for label, n in labels:
            if label < 0:
                raise reader.error(n, f"label {label}: CALFW labels are identity numbers, 0 = not")
        same = labels[0][0] != 0 and labels[1][0] != 0
        reader.add(reader.image(t1[0], n1), reader.image(t2[0], n2), same, n1)


def _read_cfp(root: Path, protocol: str) -> tuple[list[tuple[str, str, bool]], list[int]]:
    """CFP rows and folds; ``root`` is the CFP root (``Protocol/``, ``Data/``)."""

    def pair_list(name: str) -> list[str]:
        path = root / "Protocol" / name
        reader = _Reader(root, path)
        out = []
        for line_no, t in _lines(path):
            if len(t) != 2 or _int(t[0], reader, line_no) != len(out) + 1:
                raise reader.error(line_no, f"expected '{len(out) + 1} <path>', got {t}")
            rel = str(Path(t[1]).relative_to("..")) if t[1].startswith("../") else t[1]
            out.append(reader.image(rel, line_no))
        return out

    frontal = pair_list("Pair_list_F.txt")
    second = frontal if protocol == "FF" else pair_list("Pair_list_P.txt")
    split = root / "Protocol" / "Split" / protocol
    folders = sorted(p for p in split.iterdir() if p.is_dir()) if split.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"no fold folders under {split}")
    rows, folds = [], []
    for fold, folder in enumerate(folders):
        for kind in ("same", "diff"):
            path = folder / f"{kind}.txt"
            reader = _Reader(root, path)
            for line_no, t in _lines(path):
                if len(t) != 2:
                    raise reader.error(line_no, f"expected 'i,j', got {t}")
                i, j = _int(t[0], reader, line_no), _int(t[1], reader, line_no)
                if not (1 <= i <= len(frontal) and 1 <= j <= len(second)):
                    raise reader.error(
                        line_no, f"{i},{j} outside 1..{len(frontal)} / 1..{len(second)}"
                    )
                rows.append((frontal[i - 1], second[j - 1], kind == "same"))
                folds.append(fold)
    return rows, folds


class PairFaces(FileFaces):
    """The images a verification pair list names (each once, in order of first mention), with
    the pairs over their positions in :attr:`pairs`.

    root: the image folder (the data set root for ``lfw`` and the CFP layouts); pairs_file: the
    pair list (unused by the CFP layouts, which read ``root/Protocol``); layout: one of
    :data:`LAYOUTS`; folds: number of equal consecutive folds for ``triplets``/``calfw``
    (``lfw`` reads it from its header); label_pattern: identity of a flat-folder file name
    (:data:`faceemd.data.faceset.LABEL_PATTERNS` key or regex; unmatched names are their own
    identity). Identities only name the images here; verification reads only the pair labels.
    """

    def __init__(
        self,
        root: str | Path,
        layout: str,
        pairs_file: str | Path | None = None,
        folds: int = 10,
        label_pattern: str = "lfw",
        on_bad_image: str = "error",
        landmarks: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(root, on_bad_image, landmarks, max_pixels)
        if layout.startswith("cfp"):
            source = self.root / "Protocol"
            rows, fold = _read_cfp(self.root, layout[4:].upper())
        else:
            if pairs_file is None:
                raise ValueError(f"layout {layout!r} needs pairs_file")
            source = Path(pairs_file)
            reader = _Reader(self.root, source)
            if layout == "lfw":
                folds = _read_lfw(reader)
            else:
                (_read_triplets if layout == "triplets" else _read_calfw)(reader)
            rows = reader.rows
            if folds < 1 or len(rows) % folds:
                raise ValueError(
                    f"{source}: {len(rows)} pairs do not split into {folds} equal folds "
                    "(set folds to a divisor)"
                )
            size = len(rows) // folds
            fold = [i // size for i in range(len(rows))]
        rows, fold = _checked_pairs(rows, fold, source)
        position: dict[str, int] = {}
        for a, b, _ in rows:
            for rel in (a, b):
                position.setdefault(rel, len(position))
        self.files = list(position)
        regex = re.compile(LABEL_PATTERNS.get(label_pattern, label_pattern))
        self.labels = [_identity(rel, layout, regex) for rel in self.files]
        self.pairs = Pairs(
            np.array([position[a] for a, _, _ in rows], np.int64),
            np.array([position[b] for _, b, _ in rows], np.int64),
            np.array([s for _, _, s in rows], bool),
            np.asarray(fold, np.int64),
        )


def _checked_pairs(rows: list, fold: list, source: Path) -> tuple[list, list]:
    """The rows and folds of a pair list that verification can use, checked before any image
    is read: a pair of an image with itself is dropped (it says nothing about a model), with
    a warning counting them; a pair listed twice is kept, with a warning counting them; fewer
    than 2 folds, or pairs of one class only, are refused (the protocol's accuracy picks each
    fold's threshold on the other folds and needs both classes)."""
    selfish = [i for i, (a, b, _) in enumerate(rows) if a == b]
    if selfish:
        log.warning(
            "%s: %d pair(s) of an image with itself left out (e.g. %s)",
            source, len(selfish), rows[selfish[0]][0],
        )  # fmt: skip
        keep = [i for i in range(len(rows)) if rows[i][0] != rows[i][1]]
        rows, fold = [rows[i] for i in keep], [fold[i] for i in keep]
    seen = Counter(frozenset((a, b)) for a, b, _ in rows)
    repeats = sum(c - 1 for c in seen.values())
    if repeats:
        log.warning(
            "%s: %d pair(s) listed more than once (kept: the protocol counts each listing)",
            source,
            repeats,
        )
    if len(set(fold)) < 2:
        raise ValueError(
            f"{source}: the pairs fall into {len(set(fold))} fold(s); verification accuracy "
            "needs at least 2 (each fold's threshold is chosen on the others)"
        )
    classes = {same for _, _, same in rows}
    if len(classes) < 2:
        which = "same-person" if True in classes else "different-person"
        raise ValueError(
            f"{source}: every pair is a {which} pair; verification needs both kinds "
            "(check the label column: 1 = same person, 0 or -1 = not)"
        )
    return rows, fold


def _identity(rel: str, layout: str, regex: re.Pattern) -> str:
    parts = Path(rel).parts
    if layout.startswith("cfp"):
        return parts[-3]  # Data/Images/<id>/<pose>/NN.jpg
    if layout == "lfw":
        return parts[-2]
    match = regex.fullmatch(Path(rel).stem)
    return match.group("name") if match else Path(rel).stem


def pairs_of(faces) -> Pairs:
    """The pairs of ``faces`` over its own positions: a :class:`PairFaces`, or a set made from
    one image by image (aligned, occluded: ``source`` and ``source_index``), where pairs whose
    image was skipped are dropped and counted."""
    if hasattr(faces, "pairs"):
        return faces.pairs
    if not (hasattr(faces, "source") and hasattr(faces, "source_index")):
        raise ValueError(
            f"{type(faces).__name__} has no verification pairs: use PairFaces (data.faces) "
            "or a set made from one"
        )
    inner = pairs_of(faces.source)
    where = np.full(len(faces.source), -1, np.int64)
    where[np.asarray(faces.source_index, np.int64)] = np.arange(len(faces.source_index))
    first, second = where[inner.first], where[inner.second]
    keep = (first >= 0) & (second >= 0)
    return Pairs(
        first[keep],
        second[keep],
        inner.same[keep],
        inner.fold[keep],
        inner.dropped + int((~keep).sum()),
    )


def images_in_pairs(pairs_file: Path, root: Path, stems: dict[str, str]) -> list[str]:
    """Distinct image files named in a pair list, in order of first mention."""
    if not pairs_file.is_file():
        raise FileNotFoundError(
            f"pair file not found: {pairs_file} (download it with the dataset, or set "
            "pairs_file: null to use every image of the folder)"
        )
    seen: dict[str, None] = {}
    for line_no, line in enumerate(read_text_lines(pairs_file), 1):
        for token in line.split():
            if Path(token).suffix.lower() in IMAGE_SUFFIXES:
                stem = Path(token).stem
                if stem not in stems:
                    raise BadImageError(
                        f"{pairs_file}:{line_no} names {token}, which is not in {root}"
                    )
                seen.setdefault(stems[stem], None)
    if not seen:
        raise ValueError(f"pair file {pairs_file} names no image file")
    return list(seen)
