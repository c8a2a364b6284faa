"""Face image sets on disk, one reader per distributed layout (``shared/docs/DATASETS.md``).

- :class:`ImageFolderFaces`: identity folders ``<Name>/<Name>_NNNN.jpg`` (LFW, TALFW).
- :class:`FlatFolderFaces`: one folder, identity parsed from the file name (CALFW and MLFW
  ``<Name>_NNNN``, AgeDB ``<no>_<Name>_<age>_<g>``), optionally restricted to the images a pair
  file names (MLFW ``pairs.txt``: ``img1 img2 label``; CALFW ``pairs_CALFW.txt``: ``img label``).
- :class:`CfpFaces`: CFP ``Data/Images/<id>/{frontal,profile}/NN.jpg``.
- :class:`ImageListFaces`: the public DeepFace-EMD ``relpath,label`` lists.

Each is a :class:`faceemd.data.faceset.FileFaces` (items, landmarks, fingerprint).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from faceemd.data.decoding import MAX_PIXELS
from faceemd.data.errors import NoFaceError
from faceemd.data.faceset import LABEL_PATTERNS, FileFaces, listing
from faceemd.data.pairs import images_in_pairs

__all__ = ["CfpFaces", "FlatFolderFaces", "ImageFolderFaces", "ImageListFaces"]

log = logging.getLogger(__name__)


class ImageFolderFaces(FileFaces):
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
        for folder in listing(self.root)[1]:
            images = listing(os.path.join(self.root, folder))[0]
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


class ImageListFaces(FileFaces):
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


class FlatFolderFaces(FileFaces):
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
        images = listing(self.root)[0]
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
            images = images_in_pairs(Path(pairs_file), self.root, stems)
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


class CfpFaces(FileFaces):
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
        for ident in listing(images)[1]:
            for kind in ("frontal", "profile") if pose == "all" else (pose,):
                found = listing(images / ident / kind)[0]
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
