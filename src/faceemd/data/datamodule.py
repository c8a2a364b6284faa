"""Identification datamodule (a query set and a gallery set) and verification datamodule (one
set of images and the pairs over it), prepared for one backbone.

``query`` and ``gallery`` are any face sets whose items are ``(image, identity name,
landmarks)`` (:mod:`faceemd.data.synthetic`, :mod:`faceemd.data.layouts`). With
``gallery=None`` the query set is its own gallery and each query's own image is excluded from
its ranking (LFW protocol). Identity names of both sets share one integer vocabulary.
Loaders yield dicts ``image (B, C, h, w)``, ``label (B,)``, ``index (B,)`` (position in its set),
``landmarks (B, 68, 2)`` (NaN where unknown) and ``skipped`` (bad images dropped from the batch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from faceemd.data.pairs import pairs_of
from faceemd.data.transforms import FaceInput

__all__ = ["IdentificationDataModule", "PreparedFaces", "VerificationDataModule", "collate_faces"]

log = logging.getLogger(__name__)


class PreparedFaces(Dataset):
    """Applies the backbone input transform and the shared label vocabulary to a face set.

    Subclasses change the image before the input transform by overriding :meth:`transform`
    (training augmentation, :class:`faceemd.data.train_datamodule.TrainFaces`).
    """

    def __init__(self, faces, face_input: FaceInput, vocab: dict[str, int]) -> None:
        self.faces = faces
        self.face_input = face_input
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, key: int | tuple[int, int]):
        """key: a position, or ``(position, seed)`` where the item's random transform must be
        a function of ``seed`` (:class:`faceemd.data.train_datamodule.SeededEpochSampler`)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.faces[index]
        if item is None:
            return None
        image, name, lmk = item
        image, lmk = self.transform(image, np.asarray(lmk, np.float32), index, seed)
        x, lmk = self.face_input(np.ascontiguousarray(image), lmk)
        return {
            "image": x,
            "label": self.vocab[name],
            "index": index,
            "landmarks": torch.from_numpy(
                np.array(lmk, np.float32)
            ),  # a copy: sets keep theirs read-only
        }

    def transform(self, image: np.ndarray, lmk: np.ndarray, index: int, seed: int | None):
        """``(image, landmarks (68, 2))`` of item ``index`` before the input transform; a random
        transform draws from ``seed`` (None: from numpy's global generator)."""
        return image, lmk


def collate_faces(items):
    """Batch the readable items; ``skipped`` counts the unreadable ones (None)."""
    kept = [it for it in items if it is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


class IdentificationDataModule(L.LightningDataModule):
    """Query and gallery loaders (test/validation: ``[query, gallery]``).

    face_input: the backbone's input spec (set by the entry point from the backbone config).
    frame: the alignment template the images on disk follow (a name of
    :data:`faceemd.data.align.TEMPLATES`; None: unknown, images are only resized); with the
    backbone's own template known, images are warped into it (:meth:`FaceInput.in_frame`).
    same_images: true when the gallery is the query set itself (``gallery=None``).
    exclude_own_original: for query sets made image by image from the gallery's own files
    (occluded, adversarial: ``source`` and ``source_index``), leave each query's clean
    original out of its ranking (the paper's protocols keep it in: false).
    limit_queries: rank only the query set's first N images (a quick look at a protocol;
    ``metrics.json`` records it as ``eval/limited_queries``); file-backed query sets only.
    """

    def __init__(
        self,
        query,
        gallery=None,
        face_input: FaceInput | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        frame: str | None = None,
        exclude_own_original: bool = False,
        limit_queries: int | None = None,
    ) -> None:
        super().__init__()
        self.exclude_own_original = bool(exclude_own_original)
        self.limit_queries = None if limit_queries is None else int(limit_queries)
        self.query = query
        self.gallery = gallery
        self.face_input = face_input
        self.frame = frame
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.vocab: dict[str, int] = {}

    @property
    def same_images(self) -> bool:
        return self.gallery is None

    def setup(self, stage: str | None = None) -> None:
        if self.face_input is None:
            raise ValueError(
                "IdentificationDataModule needs face_input (the backbone's input spec)"
            )
        self.face_input = self.face_input.in_frame(self.frame)
        if self.limit_queries is not None:
            if self.gallery is None:
                raise ValueError(
                    "limit_queries needs a separate gallery: on a protocol whose queries are "
                    "their own gallery (lfw) it would shrink the gallery too"
                )
            if not hasattr(self.query, "keep_first"):
                raise ValueError(
                    f"limit_queries needs a file-backed query set, not {type(self.query).__name__}"
                )
            self.query.keep_first(self.limit_queries)
        names = set(self.query.label_names())
        if self.gallery is not None:
            names |= set(self.gallery.label_names())
        self.vocab = {name: i for i, name in enumerate(sorted(names))}
        for role, faces in (("query", self.query), ("gallery", self.gallery)):
            if faces is not None and hasattr(faces, "summary"):
                log.info("%s set: %s", role, faces.summary())

    def labels_of(self, faces) -> torch.Tensor:
        """Integer label of every position of ``faces`` (``(len(faces),)``, after setup)."""
        return torch.tensor([self.vocab[name] for name in faces.label_names()], dtype=torch.long)

    def own_originals(self) -> np.ndarray | None:
        """``(len(query),)`` gallery position of each query's clean original (-1: none) when
        ``exclude_own_original`` is set, else None. Raises ``ValueError`` when the query set
        was not made from the gallery's files."""
        if not self.exclude_own_original:
            return None
        source = getattr(self.query, "source", None)
        files = getattr(source, "files", None)
        gallery_files = getattr(self.gallery, "files", None)
        same_root = (
            files is not None
            and gallery_files is not None
            and Path(source.root).resolve() == Path(self.gallery.root).resolve()
        )
        if not same_root:
            raise ValueError(
                "exclude_own_original needs a query set made image by image from the gallery's "
                "own files (an occluded or adversarial set of the gallery's folder)"
            )
        where = {rel: i for i, rel in enumerate(gallery_files)}
        return np.array([where.get(files[s], -1) for s in self.query.source_index], dtype=np.int64)

    def loader(self, faces) -> DataLoader:
        """An ordered loader over one face set, prepared for the backbone."""
        return DataLoader(
            PreparedFaces(faces, self.face_input, self.vocab),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
            collate_fn=collate_faces,
        )

    def test_dataloader(self) -> list[DataLoader]:
        loaders = [self.loader(self.query)]
        if self.gallery is not None:
            loaders.append(self.loader(self.gallery))
        return loaders

    val_dataloader = test_dataloader


class VerificationDataModule(IdentificationDataModule):
    """The images of a verification pair list as one set (extracted once, like a query set
    that is its own gallery) and :attr:`pairs` (:class:`faceemd.data.pairs.Pairs`) over its
    positions, read after setup from ``faces`` (a :class:`faceemd.data.pairs.PairFaces`,
    possibly wrapped in an aligned or occluded set; pairs that lost an image are dropped and
    counted)."""

    def __init__(
        self,
        faces,
        face_input: FaceInput | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        frame: str | None = None,
    ) -> None:
        super().__init__(faces, None, face_input, batch_size, num_workers, frame)
        self.pairs = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.pairs = pairs_of(self.query)
        log.info(
            "verification pairs: %d (%d same, %d folds), %d dropped (an image without a face)",
            len(self.pairs),
            int(self.pairs.same.sum()),
            len(set(self.pairs.fold.tolist())),
            self.pairs.dropped,
        )
