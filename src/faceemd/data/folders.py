"""Face image sets on disk, one reader per distributed layout (``shared/docs/DATASETS.md``).

- :class:`ImageFolderFaces`: identity folders ``<Name>/<Name>_NNNN.jpg`` (LFW, TALFW).
- :class:`FlatFolderFaces`: one folder, identity parsed from the file name (CALFW and MLFW
  ``<Name>_NNNN``, AgeDB ``<no>_<Name>_<age>_<g>``), optionally restricted to the images a pair
  file names (MLFW ``pairs.txt``: ``img1 img2 label``; CALFW ``pairs_CALFW.txt``: ``img label``).
- :class:`CfpFaces`: CFP ``Data/Images/<id>/{frontal,profile}/NN.jpg``.
- :class:`ImageListFaces`: the public DeepFace-EMD ``relpath,label`` lists.

Items are ``(image uint8 (H, W) or (H, W, 3), identity name, landmarks (68, 2) or NaN)``.
Landmarks come from a ``landmarks68.tsv`` beside the images when one exists (format in
``shared/data/README.md``: ``relpath<TAB>x0<TAB>y0...``), else NaN. An unreadable image raises
:class:`BadImageError` naming the file, or yields ``None`` when ``on_bad_image='skip'`` so that
the loader drops it and counts it (never a silently wrong label).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from faceemd.storage.filememo import kept

__all__ = [
    "BadImageError",
    "CfpFaces",
    "FlatFolderFaces",
    "ImageFolderFaces",
    "ImageListFaces",
    "LABEL_PATTERNS",
    "MAX_PIXELS",
    "NoFaceError",
    "read_image",
    "read_landmarks",
]

# File-name patterns whose ``name`` group is the identity (flat layouts).
LABEL_PATTERNS = {
    "lfw": r"(?P<name>.+?)_\d{4}(?:_.*)?",  # CALFW, TALFW; MLFW adds a suffix
    "agedb": r"\d+_(?P<name>.+)_\d+_[mfMF]",
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

log = logging.getLogger(__name__)


def _listing(folder: str | Path) -> tuple[list[str], list[str]]:
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


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded."""


class NoFaceError(ValueError):
    """No usable face (box or landmarks) in an image that needs one."""


# Larger images are refused before they are decoded (a 20000 x 20000 JPEG of 6 MB decodes to
# 1.2 GB); face sets take ``max_pixels`` to change it.
MAX_PIXELS = 40_000_000


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` RGB, as a viewer shows it.

    A missing, corrupt or *truncated* file (libjpeg only warns about a premature end: the
    rest of the image would be grey) is a :class:`BadImageError` naming it, as is an image
    of more than ``max_pixels`` pixels (checked from the header, before decoding). The EXIF
    orientation tag is applied (a phone photo stored sideways comes out upright); 16-bit
    images are converted exactly (``round(x / 257)``), not stretched per image; palette,
    alpha and CMYK images become RGB.
    """
    hint = "fix or remove it, or set data.on_bad_image=skip to skip it"
    if not path.is_file():
        what = "a symbolic link that loops or leads nowhere" if path.is_symlink() else "missing"
        raise BadImageError(f"image {path} is {what}; {hint}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(
                    f"image {path} is {im.width}x{im.height} pixels, above the limit of "
                    f"{max_pixels:,} (max_pixels of the data set); downscale it or raise the limit"
                )
            im.load()  # raises on a truncated or corrupt file
            im = ImageOps.exif_transpose(im)
            data = _to_uint8(im)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(
            f"image {path} cannot be decoded ({err.__class__.__name__}: {err}); {hint}"
        ) from err
    return data


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Grayscale ``(H, W)`` or RGB ``(H, W, 3)`` uint8 from any Pillow mode."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        x = np.asarray(im, dtype=np.float64)
        if x.min() < 0 or x.max() > 65535:
            raise ValueError(f"integer image values outside 0..65535 (mode {im.mode})")
        return np.round(x / 257.0).astype(np.uint8)
    if im.mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in ("1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


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


class _FileFaces:
    """Shared item loading for file-backed sets: ``self.files``, ``self.labels``, landmarks."""

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


class ImageFolderFaces(_FileFaces):
    """LFW layout ``root/<Name>/<Name>_NNNN.jpg``; the label is the folder name.

    min_images_per_identity: drop identities with fewer images (LFW protocol: 2);
    max_images_per_identity: keep only each identity's first N images (by file name) after
    that, e.g. the adversarial LFW queries (3: 4,112 of the 8,790 aligned faces);
    max_identities: keep only the first N identities (by folder name), e.g. a quick validation
    subset. An identity folder with no image is reported, not silently used.
    """

    def __init__(
        self,
        root: str | Path,
        min_images_per_identity: int = 1,
        on_bad_image: str = "error",
        landmarks: str | None = None,
        max_pixels: int = MAX_PIXELS,
        max_identities: int | None = None,
        max_images_per_identity: int | None = None,
    ) -> None:
        super().__init__(root, on_bad_image, landmarks, max_pixels)
        empty = []
        for folder in _listing(self.root)[1]:
            images = _listing(os.path.join(self.root, folder))[0]
            if not images:
                empty.append(folder)
                continue
            self.files += [f"{folder}/{name}" for name in images]
            self.labels += [folder] * len(images)
        self._keep_identities(min_images_per_identity)
        if max_images_per_identity is not None:
            if int(max_images_per_identity) < 1:
                raise ValueError(
                    f"max_images_per_identity must be >= 1, got {max_images_per_identity}"
                )
            seen: Counter = Counter()
            pairs = []
            for f, lb in zip(self.files, self.labels, strict=True):
                seen[lb] += 1
                if seen[lb] <= int(max_images_per_identity):
                    pairs.append((f, lb))
            self.files, self.labels = [f for f, _ in pairs], [lb for _, lb in pairs]
        if max_identities is not None:
            kept = set(sorted(set(self.labels))[:max_identities])
            pairs = [(f, lb) for f, lb in zip(self.files, self.labels, strict=True) if lb in kept]
            self.files, self.labels = [f for f, _ in pairs], [lb for _, lb in pairs]
        self.empty_identities = empty
        if empty:
            log.warning(
                "%s: %d identity folder(s) hold no image and are left out: %s",
                self.root,
                len(empty),
                ", ".join(empty[:10]),
            )
        if not self.files:
            raise ValueError(
                f"no identity folder with >= {min_images_per_identity} image(s) under {self.root}"
                + (f" ({len(empty)} empty folders, e.g. {empty[0]})" if empty else "")
            )


class ImageListFaces(_FileFaces):
    """Public DeepFace-EMD ``data_files`` layout: lines ``relpath,label`` under ``root``."""

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path,
        on_bad_image: str = "error",
        landmarks: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        super().__init__(root, on_bad_image, landmarks, max_pixels)
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"image list not found: {list_file}")
        with open(list_file, newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), 1):
                if not row or not row[0].strip():
                    continue
                if len(row) != 2:
                    raise ValueError(f"{list_file}:{line_no}: expected 'relpath,label', got {row}")
                self.files.append(row[0].strip())
                self.labels.append(row[1].strip())
        if not self.files:
            raise ValueError(f"image list {list_file} is empty")


class FlatFolderFaces(_FileFaces):
    """All images of one folder, the identity parsed from each file name.

    label_pattern: a key of :data:`LABEL_PATTERNS` or a regular expression with a ``name``
    group, matched against the whole file stem. pairs_file: optional pair list; when
    given, only the images it names are used (first whitespace-separated tokens that name an
    image file). A file that does not match, two files with one stem, or a pair file naming a
    missing image is an error that names the file.
    """

    def __init__(
        self,
        root: str | Path,
        label_pattern: str = "lfw",
        pairs_file: str | Path | None = None,
        min_images_per_identity: int = 1,
        on_bad_image: str = "error",
        landmarks: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        super().__init__(root, on_bad_image, landmarks, max_pixels)
        regex = re.compile(LABEL_PATTERNS.get(label_pattern, label_pattern))
        if "name" not in regex.groupindex:
            raise ValueError(f"label_pattern {label_pattern!r} has no (?P<name>...) group")
        images = _listing(self.root)[0]
        stems: dict[str, str] = {}
        for name in images:
            stem = Path(name).stem
            if stem in stems:
                raise ValueError(
                    f"duplicate image name {stem!r} in {self.root}: {stems[stem]} and {name}; "
                    "remove one of them"
                )
            stems[stem] = name
        if pairs_file is not None:
            images = _images_in_pairs(Path(pairs_file), self.root, stems)
        for name in images:
            match = regex.fullmatch(Path(name).stem)
            if match is None:
                raise ValueError(
                    f"cannot read an identity from {self.root / name} with pattern "
                    f"{regex.pattern!r}; rename the file or set data.*.label_pattern"
                )
            self.files.append(name)
            self.labels.append(match.group("name"))
        self._keep_identities(min_images_per_identity)
        if not self.files:
            raise ValueError(f"no usable image under {self.root}")


def _images_in_pairs(pairs_file: Path, root: Path, stems: dict[str, str]) -> list[str]:
    """Distinct image files named in a pair list, in order of first mention."""
    if not pairs_file.is_file():
        raise FileNotFoundError(
            f"pair file not found: {pairs_file} (download it with the dataset, or set "
            "pairs_file: null to use every image of the folder)"
        )
    seen: dict[str, None] = {}
    for line_no, line in enumerate(pairs_file.read_text().splitlines(), 1):
        for token in line.split():
            stem = Path(token).stem if Path(token).suffix.lower() in IMAGE_SUFFIXES else token
            if Path(token).suffix.lower() in IMAGE_SUFFIXES:
                if stem not in stems:
                    raise BadImageError(
                        f"{pairs_file}:{line_no} names {token}, which is not in {root}"
                    )
                seen.setdefault(stems[stem], None)
    if not seen:
        raise ValueError(f"pair file {pairs_file} names no image file")
    return list(seen)


class CfpFaces(_FileFaces):
    """CFP layout ``root/Data/Images/<id>/<pose>/NN.jpg``; pose ``frontal``, ``profile`` or
    ``all`` (the paper's CFP protocol: profile queries vs frontal gallery). The identity is the
    folder id, or with ``labels='name'`` the person's name from ``Data/list_name.txt`` (line i =
    id i) written as LFW writes it (``Aaron_Rodgers``), to compare identities with LFW's. The
    photos are not aligned: wrap the set in :class:`faceemd.data.aligned.AlignedFaces`.
    :meth:`points5` derives the 5 alignment points of a frontal photo from its 30 fiducials
    (``Data/Fiducials/<id>/<pose>/NN.txt``)."""

    def __init__(
        self,
        root: str | Path,
        pose: str = "frontal",
        labels: str = "id",
        on_bad_image: str = "error",
        landmarks: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if pose not in ("frontal", "profile", "all"):
            raise ValueError(f"pose must be 'frontal', 'profile' or 'all', got {pose!r}")
        if labels not in ("id", "name"):
            raise ValueError(f"labels must be 'id' or 'name', got {labels!r}")
        super().__init__(root, on_bad_image, landmarks, max_pixels)
        images = self.root / "Data" / "Images"
        if not images.is_dir():
            raise FileNotFoundError(f"{images} not found: is {self.root} the CFP root folder?")
        names = self._names() if labels == "name" else None
        for ident in _listing(images)[1]:
            for kind in ("frontal", "profile") if pose == "all" else (pose,):
                found = _listing(images / ident / kind)[0]
                self.files += [f"Data/Images/{ident}/{kind}/{n}" for n in found]
                label = ident if names is None else names.get(int(ident))
                if label is None:
                    raise ValueError(f"identity {ident} has no line in Data/list_name.txt")
                self.labels += [label] * len(found)
        if not self.files:
            raise ValueError(f"no {pose} image under {images}")

    def _names(self) -> dict[int, str]:
        path = self.root / "Data" / "list_name.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (needed for labels='name')")
        lines = path.read_text().splitlines()
        return {i: "_".join(line.split()) for i, line in enumerate(lines, 1) if line.strip()}

    def points5(self, index: int) -> np.ndarray:
        """5 alignment points of a frontal photo from its fiducials. The 30 points mark one
        half of the face (0-8 jaw, 9-11 brow, 12-17 eye, 18-21 nose bridge down to the tip,
        22-24 nose base, 25 mouth corner, 26-29 lip midline); the other eye and mouth corner
        are mirrored across the line fitted to the bridge and lip midline. A profile photo's
        fiducials mark only the visible half: no 5-point alignment (a :class:`NoFaceError`)."""
        rel = Path(self.files[index])
        if rel.parts[-2] != "frontal":
            raise NoFaceError(
                f"{rel}: CFP fiducials of a profile face mark only its visible half, not both "
                "eyes; align profile photos with the detector (points: detector)"
            )
        path = self.root / "Data" / "Fiducials" / rel.parts[-3] / "frontal" / f"{rel.stem}.txt"
        try:
            pts = np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, ValueError) as err:
            raise NoFaceError(f"{rel}: fiducials {path} unreadable ({err})") from err
        if pts.shape != (30, 2) or not np.isfinite(pts).all():
            raise NoFaceError(f"{path}: expected 30 'x,y' lines, got shape {pts.shape}")
        midline = np.concatenate([pts[18:22], pts[26:30]])
        centre = midline.mean(0)
        direction = np.linalg.svd(midline - centre)[2][0]

        def mirrored(p: np.ndarray) -> np.ndarray:
            return 2 * (centre + ((p - centre) @ direction) * direction) - p

        eye, corner = pts[12:18].mean(0), pts[25]
        eyes = sorted([eye, mirrored(eye)], key=lambda p: p[0])
        corners = sorted([corner, mirrored(corner)], key=lambda p: p[0])
        return np.stack([eyes[0], eyes[1], pts[21], corners[0], corners[1]])
