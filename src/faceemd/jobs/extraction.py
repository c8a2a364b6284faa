"""Features of a job's image sets: from the feature cache, or extracted with Lightning's test loop.

Each set is cut into :class:`Part` s of ``cache.chunk_images`` images; every part is cached as
soon as it is extracted, so a killed run resumes at the first missing part. A memory-mapped set
of several parts is merged once into one entry (a gallery larger than RAM must not be
concatenated in memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from faceemd.callbacks import FeatureCollector
from faceemd.console import LabelledProgressBar
from faceemd.emd import nonfinite_rows
from faceemd.features import ExtractedFeatures
from faceemd.jobs.instantiators import build_callbacks, extraction_settings
from faceemd.models.extractor import FaceFeatureExtractor
from faceemd.models.inference import prepare_for_inference
from faceemd.storage.feature_cache import FeatureCache, cache_key, state_dict_digest

__all__ = ["Part", "check_features", "feature_ingredients", "load_or_extract", "skipped_images"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Part:
    """Images ``start:stop`` of the set ``name`` (``query`` or ``gallery``); ``key``: its cache
    entry (None when uncached); ``ingredients``: what the key was made from. Compared by
    identity: each part of a job is one object."""

    name: str
    start: int
    stop: int
    key: str | None
    ingredients: dict | None

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.stop)


def feature_ingredients(
    weights_sha256: str,
    faces,
    backbone_cfg: DictConfig,
    store_dtype: str,
    warp=None,
    content_hash: bool = False,
) -> dict | None:
    """What determines a set's features (the cache key), or None if the set has no
    fingerprint (then it is not cached). weights_sha256: :func:`state_dict_digest`; warp: the
    frame-to-input matrix of :meth:`FaceInput.in_frame` (None: resize only); content_hash:
    key file-backed sets by their files' bytes instead of sizes and times."""
    if not hasattr(faces, "fingerprint"):
        log.warning("%s has no fingerprint(); its features are not cached", type(faces).__name__)
        return None
    return {
        "backbone": OmegaConf.to_container(backbone_cfg.net, resolve=True),
        "weights_sha256": weights_sha256,
        "set": faces.fingerprint(content_hash=True) if content_hash else faces.fingerprint(),
        "input": OmegaConf.to_container(backbone_cfg.input, resolve=True),
        "flip_test": bool(backbone_cfg.flip_test),
        "store_dtype": store_dtype,
        "warp": warp,
    }


def check_features(name: str, feats: ExtractedFeatures, faces) -> None:
    """Raise ``ValueError`` naming the images whose features hold NaN/Inf (never cached)."""
    bad = sorted(set(nonfinite_rows(feats.embeddings)) | set(nonfinite_rows(feats.patches)))
    if bad:
        files = getattr(faces, "files", None)
        ids = [files[i] if files else f"#{i}" for i in feats.index[bad].tolist()]
        shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise ValueError(
            f"{name} features of {len(ids)} image(s) hold NaN/Inf: {shown}; check those images "
            "(blank or corrupt?) and the backbone weights (half precision can overflow: try "
            "trainer.precision=32)"
        )


def _parts(n: int, chunk: int) -> list[tuple[int, int]]:
    chunk = chunk if chunk and chunk > 0 else max(n, 1)
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _concat(parts: list[tuple[tuple[int, int], ExtractedFeatures]]) -> ExtractedFeatures:
    """One set's features from its parts (indices offset to set positions)."""
    if len(parts) == 1 and parts[0][0][0] == 0:
        return parts[0][1]
    first = parts[0][1]
    summaries = None
    if all(f.summaries is not None for _, f in parts):
        summaries = (
            torch.cat([f.summaries[0] for _, f in parts]),
            torch.cat([f.summaries[1] for _, f in parts]),
        )
    return ExtractedFeatures(
        embeddings=torch.cat([f.embeddings for _, f in parts]),
        patches=torch.cat([f.patches for _, f in parts]),
        index=torch.cat([f.index + a for (a, _), f in parts]),
        landmarks=torch.cat([f.landmarks for _, f in parts]),
        grid_shape=first.grid_shape,
        image_size=first.image_size,
        skipped=sum(f.skipped for _, f in parts),
        summaries=summaries,
    )


def load_or_extract(
    cfg: DictConfig, backbone, datamodule, loggers: list, cache: FeatureCache | None
) -> tuple[dict[str, ExtractedFeatures], dict[str, float], bool]:
    """Features of the query set (and gallery set) from the cache, extracting what is missing.

    Each set is cut into parts of ``cache.chunk_images`` images; every part is cached as soon
    as it is extracted, so a killed run resumes at the first missing part. Extraction runs
    Lightning's test loop on the configured Trainer (devices, strategy) with a
    :class:`FeatureCollector`, on the backbone prepared for inference (``cfg.extraction``:
    runtime, batch norm folding, channels_last; :mod:`faceemd.models.inference`); rank 0
    writes the cache. Returns ``(features by set name,
    eval/* counters, is_global_zero)``; features carry labels. cache: None extracts all.
    """
    sets = {"query": datamodule.query}
    if not datamodule.same_images:
        sets["gallery"] = datamodule.gallery
    chunk = cache.settings.chunk_images if cache is not None else 0
    digest = state_dict_digest(backbone) if cache else ""
    units: list[Part] = []
    for name, faces in sets.items():
        ingredients = None
        if cache is not None:
            ingredients = feature_ingredients(
                digest,
                faces,
                cfg.backbone,
                cache.dtype,
                datamodule.face_input.warp,
                cache.settings.content_hash,
            )
        for a, b in _parts(len(faces), chunk):
            part = {**ingredients, "part": [a, b, len(faces)]} if ingredients else None
            units.append(Part(name, a, b, cache_key(**part) if part else None, part))
    # Mapped sets of several parts are served by one merged entry (see _merge_parts); where it
    # exists, its parts need not be read.
    merged_keys = {}
    if cache is not None and cache.mmap:
        for name in sets:
            keys = [u.key for u in units if u.name == name]
            if len(keys) > 1:
                merged_keys[name] = cache_key(kind="merged", parts=keys)
    whole = {name: cache.load(key) for name, key in merged_keys.items()}
    pending = [u for u in units if whole.get(u.name) is None]
    got = {u: cache.load(u.key) if u.key else None for u in pending}
    missing = [u for u in pending if got[u] is None]
    is_zero, seconds = True, 0.0
    if missing:
        collector = FeatureCollector()
        callbacks = [collector, *build_callbacks(cfg.get("callbacks"))]
        bar = None
        if cfg.trainer.get("enable_progress_bar", True):
            bar = LabelledProgressBar()
            callbacks.append(bar)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        net = prepare_for_inference(
            backbone,
            (int(cfg.backbone.input.channels), *map(int, cfg.backbone.input.size)),
            extraction_settings(cfg.get("extraction")),
        )
        extractor = FaceFeatureExtractor(net, flip=cfg.backbone.flip_test)
        for u in missing:
            loader = datamodule.loader(Subset(sets[u.name], range(u.start, u.stop)))
            if bar is not None:
                bar.label = f"extracting {u.name} faces"
            trainer.test(extractor, dataloaders=[loader], verbose=False)
            is_zero = trainer.is_global_zero
            seconds += collector.extract_seconds
            extracted = collector.features[0]
            check_features(u.name, _concat([(u.span, extracted)]), sets[u.name])
            got[u] = extracted
            if u.key and is_zero:
                cache.save(u.key, extracted, u.ingredients)
    feats = {}
    for name, faces in sets.items():
        own = [u for u in units if u.name == name]
        if name in merged_keys and whole[name] is None and is_zero:
            whole[name] = _merge_parts(cache, merged_keys[name], own, got, set(missing))
        if whole.get(name) is not None:
            feats[name] = whole[name]
        else:
            feats[name] = _concat([(u.span, got[u]) for u in own])
        feats[name].with_labels(datamodule.labels_of(faces))
        feats[name].verified = True  # checked when extracted, or on load from the cache
        keys = [u.key for u in own]
        feats[name].key = cache_key(parts=keys) if all(keys) else None
    counters = {
        "eval/extracted_sets": len({u.name for u in missing}),
        "eval/cached_sets": len(sets) - len({u.name for u in missing}),
        "eval/extracted_parts": len(missing),
        "eval/cached_parts": len(units) - len(missing),
        "eval/extract_seconds": seconds,
        "eval/skipped_images": sum(f.skipped for f in feats.values()),
    }
    return feats, counters, is_zero


def _merge_parts(cache: FeatureCache, key: str, own: list[Part], got: dict, extracted: set):
    """Write one set's parts (``own``) as one entry and map it: concatenating mapped parts
    would copy a gallery larger than RAM into memory. Parts extracted in this run (in
    ``extracted``) are read back from their entries, so every part is in its stored form."""
    parts = []
    for u in own:
        part = cache.load(u.key) if u in extracted else got[u]
        if part is None:
            return None  # a part could not be cached: concatenate in memory instead
        parts.append((u.start, part))
    cache.save_merged(key, parts, {"parts": [u.key for u in own]})
    return cache.load(key)


def skipped_images(feats: dict[str, ExtractedFeatures], sets: dict) -> dict[str, list[str]]:
    """Names of the images each set skipped: those that could not be made into the set (no
    face found for an alignment or an overlay: ``"<source image>: <reason>"``) and those
    unreadable at extraction (positions without a feature row)."""
    out = {}
    for name, f in feats.items():
        faces = sets[name]
        missing = sorted(set(range(len(faces))) - set(f.index.tolist()))
        files = getattr(faces, "files", None)
        out[name] = [rel for rel, _ in getattr(faces, "skip_list", [])]
        out[name] += [files[i] if files is not None else f"#{i}" for i in missing]
    return out
