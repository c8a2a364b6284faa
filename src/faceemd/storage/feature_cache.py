"""On-disk cache of extracted features, shared by every job of a sweep.

An entry holds the :class:`faceemd.features.ExtractedFeatures` of one image set and is keyed by
what determines them: the backbone's weights (a hash of its state dict, so a random init with
a given seed and a checkpoint file are treated alike), the set's fingerprint (its manifest:
files, sizes, modification times, or the generator's parameters) and the preprocessing (input
size, normalisation, flip-test, stored dtype). Anything else (grid pooling, weighting, alpha,
k) is applied after loading.

Format: one safetensors file per entry, ``<root>/<key[:2]>/<key>.safetensors``, with the key's
ingredients and a SHA-256 of the tensors in its metadata. Writes go to a temporary file that is
renamed into place, so a killed writer never leaves a file a later run trusts; a file whose
checksum does not match is reported, deleted and rebuilt. ``mmap=True`` maps the tensors from
the file (numpy memmap) instead of reading them into memory, for galleries larger than RAM; a
set extracted in parts is then merged into one entry (:meth:`FeatureCache.save_merged`).

The jobs of a sweep launched by Hydra's basic launcher run one after another in one process;
the sets a job loaded are kept in memory for the next job (``memo_mb``, least recently used
first out), so a sweep reads and verifies each set once instead of once per job. A kept set is
reused only while its file is unchanged (:mod:`faceemd.storage.filememo`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from faceemd.emd.bank import patch_summaries
from faceemd.features import ExtractedFeatures
from faceemd.storage.atomic import TEMPORARY_MARK, atomic_write
from faceemd.storage.filememo import kept

__all__ = ["CacheSettings", "FeatureCache", "cache_key", "state_dict_digest"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_TENSORS = ("embeddings", "patches", "index", "landmarks", "patch_norms", "patch_means")
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class CacheSettings:
    """The ``cache`` group (``conf/cache/disk.yaml`` lists the same values; a test keeps them
    equal): the only source of its defaults.

    enabled: use the cache (``cache=off``: every job extracts). dir: its folder. dtype, mmap,
    verify, memo_mb: see :class:`FeatureCache`. sweep_weightings: in a sweep over
    ``rerank.weighting`` the first job scores every swept weighting and caches them
    (:class:`faceemd.storage.score_cache.ScoreCache`). chunk_images: images per cached part (a
    killed extraction resumes at the first missing part; 0: one part). content_hash: key image
    folders by their files' bytes instead of sizes and times.
    """

    enabled: bool = True
    dir: str = "outputs/cache"
    dtype: str = "float32"
    mmap: bool = False
    memo_mb: int = 4096
    sweep_weightings: bool = True
    verify: bool = True
    chunk_images: int = 20000
    content_hash: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _STORE_DTYPES:
            raise ValueError(
                f"cache dtype must be one of {list(_STORE_DTYPES)}, got {self.dtype!r}"
            )
        if int(self.chunk_images) < 0 or int(self.memo_mb) < 0:
            raise ValueError("cache.chunk_images and cache.memo_mb must be >= 0")


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 over the names, shapes and values of a module's state dict, and over the
    ``source_digest`` of submodules whose weights live outside it (ONNX graphs)."""
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        if getattr(sub, "source_digest", None):
            h.update(f"{name}:{sub.source_digest}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(**ingredients) -> str:
    """Hex key of JSON-serialisable ingredients (order-independent)."""
    blob = json.dumps({"version": FORMAT_VERSION, **ingredients}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_BLOCK = 1 << 26  # hash in 64 MiB blocks: a large entry is streamed, never copied whole


def _blocks(arr: np.ndarray, fh=None):
    """The bytes of ``arr`` in blocks: read from the open file ``fh`` for a memory map (so that
    checking an entry leaves none of its pages mapped into the process), else sliced."""
    if fh is None or not isinstance(arr, np.memmap):
        flat = arr.reshape(-1).view(np.uint8)
        yield from (flat[i : i + _BLOCK] for i in range(0, flat.size, _BLOCK))
        return
    fh.seek(arr.offset)
    left = arr.nbytes
    while left:
        block = fh.read(min(left, _BLOCK))
        if not block:
            raise ValueError("tensor data is truncated")
        yield block
        left -= len(block)


def _scan(arrays: dict, path: Path | None = None, digest: bool = True, finite=()) -> tuple:
    """One pass over the tensors/arrays, in name order: ``(SHA-256 over name, dtype, shape and
    bytes, or None without ``digest``; the first of the ``finite`` names holding a NaN/Inf, or
    None)``. With ``path``, memory-mapped arrays are read from that file."""
    h = hashlib.sha256()
    bad = None
    fh = open(path, "rb") if path is not None else None
    try:
        for name in sorted(arrays):
            arr = arrays[name]
            arr = arr.numpy() if isinstance(arr, torch.Tensor) else arr
            check = name in finite and bad is None and arr.dtype.kind == "f"
            if not (digest or check):
                continue
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
            for block in _blocks(arr, fh):
                if digest:
                    h.update(block)
                if check and not np.isfinite(np.frombuffer(block, arr.dtype)).all():
                    bad, check = name, False
    finally:
        if fh is not None:
            fh.close()
    return (h.hexdigest() if digest else None), bad


def _digest(arrays: dict, path: Path | None = None) -> str:
    """SHA-256 over the name, dtype, shape and bytes of each tensor/array (see :func:`_scan`)."""
    return _scan(arrays, path)[0]


# Values that must be finite in an entry (landmarks are NaN where unknown).
_FINITE = ("embeddings", "patches", "patch_norms", "patch_means", "emd")


def _nbytes(feats: ExtractedFeatures) -> int:
    """Memory the tensors of ``feats`` hold."""
    tensors = [feats.embeddings, feats.patches, feats.index, feats.landmarks]
    return sum(t.nbytes for t in tensors + list(feats.summaries or ()))


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entry_tensors(feats: ExtractedFeatures) -> dict[str, torch.Tensor]:
    """The tensors of an entry (:data:`_TENSORS`) from features whose patches are in their
    stored dtype and whose ``summaries`` are those of the stored patches."""
    norms, means = feats.summaries
    return {
        "embeddings": feats.embeddings.float(),
        "patches": feats.patches,
        "index": feats.index.long(),
        "landmarks": feats.landmarks.float(),
        "patch_norms": norms,
        "patch_means": means,
    }


def _entry_meta(parts: list[ExtractedFeatures], ingredients: dict | None) -> dict[str, str]:
    """An entry's metadata (what :meth:`FeatureCache.load` reads back besides the tensors) for
    the features of one set, whole or in ``parts``."""
    return {
        "grid_shape": json.dumps(list(parts[0].grid_shape)),
        "image_size": json.dumps(list(parts[0].image_size)),
        "skipped": str(sum(int(f.skipped) for f in parts)),
        "ingredients": json.dumps(ingredients or {}, sort_keys=True, default=str),
    }


class FeatureCache:
    """Directory of cached feature sets.

    root: cache folder (``outputs/cache`` by default). dtype: ``'float32'`` or ``'float16'``
    for the stored patch grids (embeddings stay float32). mmap: map entries instead of
    reading them. verify: check the SHA-256 on load (reads the whole entry once). memo_mb:
    memory the sets loaded in this process may keep between jobs (mapped sets count nothing);
    0 keeps none. ``settings``: the :class:`CacheSettings` it was made with.
    """

    def __init__(
        self,
        root: str | Path,
        dtype: str = CacheSettings.dtype,
        mmap: bool = CacheSettings.mmap,
        verify: bool = CacheSettings.verify,
        memo_mb: int = CacheSettings.memo_mb,
    ) -> None:
        self.settings = CacheSettings(dir=str(root), dtype=dtype, mmap=mmap, verify=verify,
                                      memo_mb=memo_mb)  # fmt: skip
        self.root = Path(root)
        self.dtype = dtype
        self.mmap = mmap
        self.verify = verify
        self.memo_bytes = max(0, int(memo_mb)) << 20
        self._remove_stale_temporaries()

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> FeatureCache:
        """The cache of ``settings``, which it keeps (``chunk_images``, ``content_hash`` and
        ``sweep_weightings`` are read from it by the jobs)."""
        cache = cls(settings.dir, settings.dtype, settings.mmap, settings.verify, settings.memo_mb)
        cache.settings = settings
        return cache

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files (:func:`faceemd.storage.atomic.atomic_write`) whose writer is
        no longer running (killed writes; a gallery part is gigabytes). Files of live processes
        are left alone."""
        if not self.root.is_dir():
            return
        for tmp in self.root.glob(f"*/.*{TEMPORARY_MARK}*"):
            pid = tmp.name.rsplit(TEMPORARY_MARK, 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                log.info("cache: removed %s, left by a process that no longer runs", tmp)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        """Atomic write of one entry with a SHA-256 of its tensors (the library's writer)."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        path = self.path(key)
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={**meta, "key": key, "sha256": _digest(tensors)})
        return path

    def _read(self, key: str, names: tuple[str, ...]):
        """``(tensors, metadata)`` of an entry, or None when absent or corrupt (then removed).

        Read into memory by the safetensors library; mapped (``mmap``) by :func:`_map_safetensors`,
        since the library's readers return copies, never views of the file."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            if self.mmap:
                arrays, meta = _map_safetensors(path, names)
            else:
                with safe_open(path, "numpy") as fh:
                    meta = fh.metadata() or {}
                    arrays = {name: fh.get_tensor(name) for name in names}
            if meta.get("key") != key:  # e.g. two entries' files swapped or copied over
                raise ValueError(f"the file holds entry {meta.get('key')!r}, not this one")
            # the mapped arrays are read back from the file; the library's are in memory
            digest, bad = _scan(arrays, path if self.mmap else None, self.verify, _FINITE)
            if self.verify and digest != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            if bad is not None:
                raise ValueError(f"non-finite values in {bad!r}")
        except (ValueError, KeyError, OSError, struct.error, SafetensorError) as err:
            log.warning(
                "cache: entry %s is unreadable or corrupt (%s); deleting it and computing it again",
                path,
                err,
            )
            path.unlink(missing_ok=True)
            return None
        return {k: _as_tensor(v) for k, v in arrays.items()}, meta

    def save(self, key: str, feats: ExtractedFeatures, ingredients: dict | None = None) -> Path:
        """Write the features of one image set (or part of one)."""
        patches = feats.patches.to(_STORE_DTYPES[self.dtype])
        stored = dataclasses.replace(feats, patches=patches, summaries=patch_summaries(patches))
        path = self._write(key, _entry_tensors(stored), _entry_meta([feats], ingredients))
        log.debug("feature cache: wrote %s (%d images)", path, len(feats))
        return path

    def load(self, key: str) -> ExtractedFeatures | None:
        """The features stored under ``key``, or None (absent, or corrupt and removed); a set
        this process loaded before is taken from memory while its file is unchanged
        (:func:`faceemd.storage.filememo.kept`, within ``memo_mb``)."""
        try:
            return kept(
                self.path(key),
                lambda _: self._load(key),
                f"features, mmap={self.mmap}",
                nbytes=lambda feats: 0 if self.mmap else _nbytes(feats),
                budget=self.memo_bytes,
            )
        except FileNotFoundError:
            return None

    def _load(self, key: str) -> ExtractedFeatures | None:
        entry = self._read(key, _TENSORS)
        if entry is None:
            return None
        t, meta = entry
        try:
            feats = ExtractedFeatures(
                embeddings=t["embeddings"],
                patches=t["patches"],
                index=t["index"],
                landmarks=t["landmarks"],
                grid_shape=tuple(json.loads(meta["grid_shape"])),
                image_size=tuple(json.loads(meta["image_size"])),
                skipped=int(meta["skipped"]),
                summaries=(t["patch_norms"], t["patch_means"]),
            )
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            log.warning("feature cache: entry %s is inconsistent (%s); removing it", key, err)
            self.path(key).unlink(missing_ok=True)
            return None
        log.debug("feature cache: hit %s (%d images)", self.path(key), len(feats))
        return feats

    def save_merged(
        self, key: str, parts: list[tuple[int, ExtractedFeatures]], ingredients: dict | None = None
    ) -> Path:
        """One entry for a set cached in parts (``(first position, part features)``, each as
        :meth:`load` returned it), written part by part so the set is never whole in memory: a
        mapped gallery needs one entry, since concatenating mapped parts copies them into RAM.
        The safetensors library writes only whole tensors, so this writes the format itself
        (little-endian u64 header length, JSON header, data in name order). Loads like any
        entry written by :meth:`save`."""
        arrays = {name: [] for name in _TENSORS}
        for start, f in parts:
            shifted = dataclasses.replace(f, index=f.index + start)
            for name, tensor in _entry_tensors(shifted).items():
                arrays[name].append(tensor.numpy())
        header, offset = {}, 0
        for name in sorted(arrays):  # data in name order, as the checksum reads it
            pieces = arrays[name]
            shape = [sum(a.shape[0] for a in pieces), *pieces[0].shape[1:]]
            nbytes = sum(a.nbytes for a in pieces)
            code = {np.dtype(v): k for k, v in _NP_DTYPES.items()}[pieces[0].dtype]
            header[name] = {
                "dtype": code,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        meta = {**_entry_meta([f for _, f in parts], ingredients), "key": key}

        def head(sha: str) -> bytes:
            blob = json.dumps({**header, "__metadata__": {**meta, "sha256": sha}}).encode()
            blob += b" " * (-len(blob) % 8)
            return struct.pack("<Q", len(blob)) + blob

        digest = hashlib.sha256()
        path = self.path(key)
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            fh.write(head("0" * 64))  # same length as the real digest, written at the end
            for name in sorted(arrays):
                pieces = arrays[name]
                shape = (header[name]["shape"][0], *pieces[0].shape[1:])
                digest.update(f"{name}:{pieces[0].dtype.str}:{shape}".encode())
                for piece in pieces:
                    for block in _blocks(np.ascontiguousarray(piece)):
                        digest.update(block)
                        fh.write(block)
            fh.seek(0)
            fh.write(head(digest.hexdigest()))
        log.debug("feature cache: merged %d parts into %s", len(parts), path)
        return path

    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """An entry of named tensors derived from cached sets (e.g. reduced patch grids,
        :mod:`faceemd.storage.patch_space`), written atomically with its checksum."""
        return self._write(key, tensors, {})

    def load_tensors(self, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """The tensors ``names`` of an entry written by :meth:`save_tensors` (mapped when the
        cache maps), or None (absent, or corrupt and removed)."""
        entry = self._read(key, names)
        return None if entry is None else entry[0]

    def save_scores(self, key: str, candidates: torch.Tensor, emd: torch.Tensor) -> Path:
        """Stage-2 EMD similarities ``(Q, k)`` of the stage-1 ``candidates`` ``(Q, k)``: they do
        not depend on alpha, so an alpha sweep computes them once."""
        return self._write(key, {"candidates": candidates.long(), "emd": emd.float()}, {})

    def load_scores(self, key: str, candidates: torch.Tensor) -> torch.Tensor | None:
        """Cached EMD similarities for exactly these candidates, else None."""
        entry = self._read(key, ("candidates", "emd"))
        if entry is None or not torch.equal(entry[0]["candidates"], candidates.long()):
            return None
        log.debug("score cache: hit %s", self.path(key))
        return entry[0]["emd"]


def _map_safetensors(
    path: Path, names: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map the tensors ``names`` of a safetensors file (format: u64 header length, JSON
    header, raw little-endian data) as numpy memmaps; raises ValueError on a truncated or
    malformed file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n <= 0 or 8 + n > size:
            raise ValueError(f"bad header length {n} for a {size}-byte file")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    arrays = {}
    for name in names:
        if name not in header:
            raise ValueError(f"tensor {name!r} missing")
        info = header[name]
        start, end = info["data_offsets"]
        dtype = _NP_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if 8 + n + end > size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        if end == start:
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    return arrays, meta


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a read-only map (torch warns about non-writable arrays)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)
