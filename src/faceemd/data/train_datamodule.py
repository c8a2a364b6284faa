"""Training data for finetuning: identity-labelled faces with masked augmentation (Sec. 4.3).

:class:`TrainFaces` wraps any face set (a CASIA-WebFace / LFW-style identity folder, or the
synthetic set) and, per item, either swaps in a precomputed masked copy (``masked_root`` holding
the same relative paths, as the paper's ~415K-image set) with probability ``p_masked_copy``, or
applies the albumentations pipeline of :func:`faceemd.data.augment.build_augment` (landmark-placed
masks with probability ``p_mask``, flips, jitter). :class:`FaceTrainDataModule` serves it with a
held-out identification set (an :class:`IdentificationDataModule`) for validation, after
dropping identities with too few images and those of an ``exclude_identities`` set (e.g. CFP
people who are also LFW test people), and refuses to train on an identity it validates on.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from faceemd.data.augment import build_augment
from faceemd.data.datamodule import IdentificationDataModule, PreparedFaces, collate_faces
from faceemd.data.decoding import read_image
from faceemd.data.errors import BadImageError
from faceemd.data.transforms import FaceInput

__all__ = ["FaceSubset", "FaceTrainDataModule", "SeededEpochSampler", "TrainFaces"]

log = logging.getLogger(__name__)


class FaceSubset:
    """The items ``positions`` of a face set, as a face set (``files`` kept when it has them)."""

    def __init__(self, faces, positions: list[int]) -> None:
        self.faces = faces
        self.positions = list(positions)
        names = faces.label_names()
        self.labels = [names[i] for i in self.positions]
        files = getattr(faces, "files", None)
        self.files = None if files is None else [files[i] for i in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return self.faces[self.positions[index]]

    def label_names(self) -> list[str]:
        return list(self.labels)


def select_identities(faces, min_images: int = 1, exclude=None):
    """``faces`` without the identities that have fewer than ``min_images`` images or appear in
    the set ``exclude``; both removals are logged with counts (``faces`` itself when nothing
    is removed)."""
    names = faces.label_names()
    counts = Counter(names)
    few = {n for n, c in counts.items() if c < min_images}
    excluded = set(counts) & set(exclude.label_names()) if exclude is not None else set()
    if few:
        log.info(
            "training set: %d identities with fewer than %d images skipped (%d images)",
            len(few), min_images, sum(counts[n] for n in few),
        )  # fmt: skip
    if excluded:
        log.info(
            "training set: %d identities removed because the excluded set has them too "
            "(%d images): %s",
            len(excluded), sum(counts[n] for n in excluded), ", ".join(sorted(excluded)[:20]),
        )  # fmt: skip
    if not few and not excluded:
        return faces
    drop = few | excluded
    return FaceSubset(faces, [i for i, n in enumerate(names) if n not in drop])


class SeededEpochSampler(Sampler):
    """The training order of one epoch and a seed for each item's augmentation, both drawn
    from ``(seed, epoch)`` alone: yields ``(position, item seed)`` (see
    :meth:`PreparedFaces.__getitem__`).

    A run then sees the same images in the same order for the same seed, whatever the number
    of workers, and a run resumed at epoch ``e`` sees what an uninterrupted one sees there
    (Lightning calls :meth:`set_epoch` before each epoch). A shuffling ``DataLoader`` draws its
    order from the global generator instead, whose state no checkpoint keeps."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(2**31, (self.size,), generator=g).tolist()
        return iter(zip(order, seeds, strict=True))


class TrainFaces(PreparedFaces):
    """Training items (see :class:`PreparedFaces`; ``None`` for an unreadable image, skipped).

    faces: the face set; vocab: identity name -> class id; face_input: backbone input spec;
    augment: keyword arguments of :func:`build_augment` (None: no augmentation);
    masked_root / p_masked_copy: precomputed masked copies and how often to use them.
    """

    def __init__(
        self,
        faces,
        vocab: dict[str, int],
        face_input: FaceInput,
        augment: dict | None = None,
        masked_root: str | None = None,
        p_masked_copy: float = 0.0,
    ) -> None:
        super().__init__(faces, face_input, vocab)
        self.augment = build_augment(**augment) if augment else None
        self.masked_root = Path(masked_root) if masked_root else None
        if self.masked_root is not None and not self.masked_root.is_dir():
            raise FileNotFoundError(f"masked copies folder not found: {self.masked_root}")
        self.p_masked_copy = p_masked_copy

    def transform(self, image: np.ndarray, lmk: np.ndarray, index: int, seed: int | None):
        # Every random draw of the item comes from its seed: the same seed gives the same
        # training image in any worker, after a resume and for any number of workers.
        rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)
        if self.masked_root is not None and rng.random() < self.p_masked_copy:
            try:
                image = read_image(self.masked_root / self.faces.files[index])
                lmk = np.full((68, 2), np.nan, np.float32)  # the copy's landmarks are unknown
            except BadImageError:
                pass  # no masked copy of this image: train on the original
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
            known = bool(np.isfinite(lmk).all())
            out = self.augment(
                image=image, keypoints=lmk if known else np.zeros((0, 2), np.float32)
            )
            image = out["image"]
            lmk = np.asarray(out["keypoints"], np.float32) if known else lmk
        return image, lmk


class FaceTrainDataModule(L.LightningDataModule):
    """train: the training face set; val: an identification datamodule (query vs gallery) whose
    metrics the re-ranking callback computes; face_input: set from the backbone config;
    min_images_per_identity: identities with fewer training images are skipped (counted in
    the log); exclude_identities: a face set whose identities are removed from training (e.g.
    the test set's people); seed: of the training order and augmentation
    (:class:`SeededEpochSampler`; one process; under DDP Lightning's distributed sampler orders
    the data and the augmentation draws from each worker's seeded generator). An identity in both the training and the validation set is
    refused at setup, naming it."""

    def __init__(
        self,
        train,
        val: IdentificationDataModule | None = None,
        face_input: FaceInput | None = None,
        augment: dict | None = None,
        masked_root: str | None = None,
        p_masked_copy: float = 0.0,
        batch_size: int = 64,
        num_workers: int = 0,
        min_images_per_identity: int = 1,
        exclude_identities=None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        train = select_identities(train, min_images_per_identity, exclude_identities)
        self.train_faces = train
        self.val = val
        self.face_input = face_input
        self.augment = augment
        self.masked_root = masked_root
        self.p_masked_copy = p_masked_copy
        self.batch_size = batch_size
        self.num_workers = num_workers
        names = sorted(set(train.label_names()))
        if not names:
            raise ValueError("the training set has no identity")
        self.vocab = {n: i for i, n in enumerate(names)}

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    @property
    def same_images(self) -> bool:
        return self.val is not None and self.val.same_images

    def setup(self, stage: str | None = None) -> None:
        if self.face_input is None:
            raise ValueError("FaceTrainDataModule needs face_input (the backbone's input spec)")
        if self.val is not None:
            shared = set(self.vocab)
            shared &= set(self.val.query.label_names()) | set(
                self.val.gallery.label_names() if self.val.gallery is not None else []
            )
            if shared:
                raise ValueError(
                    f"{len(shared)} identities are both training and validation identities: "
                    f"{', '.join(sorted(shared)[:20])}; remove them from one set (e.g. "
                    "train_data.exclude_identities)"
                )
            self.val.face_input = self.face_input
            self.val.setup(stage)

    def train_dataloader(self) -> DataLoader:
        data = TrainFaces(
            self.train_faces,
            self.vocab,
            self.face_input,
            dict(self.augment) if self.augment else None,
            self.masked_root,
            self.p_masked_copy,
        )
        distributed = self.trainer is not None and self.trainer.world_size > 1
        order = (
            {"shuffle": True}
            if distributed
            else {"sampler": SeededEpochSampler(len(data), self.seed)}
        )
        return DataLoader(
            data,
            batch_size=self.batch_size,
            drop_last=len(data) >= self.batch_size,
            **order,
            num_workers=self.num_workers,
            collate_fn=collate_faces,
            persistent_workers=self.num_workers > 0,
        )

    def imprint_dataloader(self) -> DataLoader:
        """The training faces in order, without augmentation or masked copies (for
        :meth:`faceemd.models.recognizer.FaceRecognizer.imprint_head`)."""
        return DataLoader(
            TrainFaces(self.train_faces, self.vocab, self.face_input),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_faces,
        )

    def val_dataloader(self):
        return [] if self.val is None else self.val.val_dataloader()
