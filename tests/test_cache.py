"""Feature cache: round trip, memory map, atomic writes, corruption, keys; grid pooling."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from faceemd.emd.weights import pool_patches
from faceemd.features import ExtractedFeatures
from faceemd.models.backbones import ArcFaceResNet18
from faceemd.storage.feature_cache import FeatureCache, cache_key, state_dict_digest

from .conftest import ROOT


def _features(n=6, grid=(4, 4), c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lmk = torch.rand(n, 68, 2, generator=g) * 64
    return ExtractedFeatures(
        embeddings=torch.randn(n, 16, generator=g),
        patches=torch.randn(n, grid[0] * grid[1], c, generator=g),
        index=torch.arange(n) * 2,
        landmarks=lmk,
        grid_shape=grid,
        image_size=(64, 64),
        skipped=1,
    )


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_is_exact(tmp_path, mmap):
    feats = _features()
    cache = FeatureCache(tmp_path, mmap=mmap)
    cache.save("ab" * 32, feats)
    back = cache.load("ab" * 32)
    for name in ("embeddings", "patches", "index", "landmarks"):
        assert torch.equal(getattr(back, name), getattr(feats, name)), name
    assert back.grid_shape == (4, 4) and back.image_size == (64, 64) and back.skipped == 1
    assert cache.load("cd" * 32) is None


def test_float16_store_halves_patches_within_fp16_precision(tmp_path):
    feats = _features()
    cache = FeatureCache(tmp_path, dtype="float16")
    cache.save("ab" * 32, feats)
    back = cache.load("ab" * 32)
    assert back.patches.dtype == torch.float16
    # fp16 has an 11-bit mantissa: relative error <= 2**-11 for normal numbers
    torch.testing.assert_close(back.patches.float(), feats.patches, rtol=2**-11, atol=1e-4)


def test_corrupted_entry_is_detected_removed_and_rebuilt(tmp_path, caplog):
    feats = _features()
    cache = FeatureCache(tmp_path)
    path = cache.save("ab" * 32, feats)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's bytes
    path.write_bytes(bytes(data))
    assert cache.load("ab" * 32) is None
    assert "corrupt" in caplog.text and not path.exists()
    cache.save("ab" * 32, feats)
    assert torch.equal(cache.load("ab" * 32).patches, feats.patches)


def test_truncated_entry_is_not_trusted(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save("ab" * 32, _features())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cache.load("ab" * 32) is None


def test_writer_killed_before_rename_leaves_nothing_trusted(tmp_path):
    """A child process dies (os._exit) between writing the data and renaming it into place."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from faceemd.storage import feature_cache as c
        from faceemd.features import ExtractedFeatures
        c.os.replace = lambda *a: os._exit(9)   # the process is killed at this point
        f = ExtractedFeatures(torch.zeros(3, 4), torch.zeros(3, 4, 2), torch.arange(3),
                              torch.zeros(3, 68, 2), (2, 2), (8, 8))
        c.FeatureCache({str(tmp_path)!r}).save("ab" * 32, f)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert out.returncode == 9, out.stderr.decode()[-2000:]
    cache = FeatureCache(tmp_path)
    assert not cache.path("ab" * 32).exists()
    assert cache.load("ab" * 32) is None


def test_key_depends_on_weights_and_set():
    torch.manual_seed(0)
    a = ArcFaceResNet18()
    torch.manual_seed(1)
    b = ArcFaceResNet18()
    same = ArcFaceResNet18()
    same.load_state_dict(a.state_dict())
    assert state_dict_digest(a) == state_dict_digest(same)
    assert state_dict_digest(a) != state_dict_digest(b)
    s = {"type": "x", "seed": 0}
    assert cache_key(weights=state_dict_digest(a), set=s) != cache_key(
        weights=state_dict_digest(b), set=s
    )
    assert cache_key(weights="w", set=s) != cache_key(weights="w", set={**s, "seed": 1})
    assert cache_key(weights="w", set=s) == cache_key(set=dict(reversed(s.items())), weights="w")


def test_pool_patches_matches_hand_computed_block_means():
    # 1 image, 4x4 grid, 1 channel holding 0..15 row-major; 2x2 pooling -> block means
    patches = torch.arange(16.0).reshape(1, 16, 1)
    pooled = pool_patches(patches, (4, 4), (2, 2))
    expected = torch.tensor([[2.5], [4.5], [10.5], [12.5]])  # mean of {0,1,4,5}, {2,3,6,7}, ...
    torch.testing.assert_close(pooled[0], expected)
    assert pool_patches(patches, (4, 4), (4, 4)) is patches


def test_to_bank_pools_attaches_labels_and_landmark_weights():
    feats = _features(n=3)
    feats.with_labels(torch.tensor([5, 6, 7, 8, 9, 10]))  # labels of set positions 0..5
    bank = feats.to_bank((2, 2))
    assert bank.patches.shape == (3, 4, 8)
    assert bank.labels.tolist() == [5, 7, 9]  # rows hold positions 0, 2, 4
    assert bank.lmk.shape == (3, 4)
    torch.testing.assert_close(bank.lmk.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="finer"):
        feats.to_bank((8, 8))
    feats.landmarks[0, 0, 0] = float("nan")  # one image without landmarks: no LMK weights
    assert feats.to_bank(None).lmk is None


def test_entries_carry_patch_summaries_of_the_stored_values(tmp_path):
    feats = _features(n=5)
    cache = FeatureCache(tmp_path, dtype="float16")
    cache.save("ab" * 32, feats)
    back = cache.load("ab" * 32)
    stored = back.patches.float()
    # independent of patch_summaries: norms and means of the float16 values actually stored
    torch.testing.assert_close(back.summaries[0], stored.pow(2).sum(-1).sqrt())
    torch.testing.assert_close(back.summaries[1], stored.sum(1) / stored.shape[1])
    back.with_labels(torch.arange(10))
    native = back.to_bank(None)
    assert native.summaries is back.summaries
    assert back.to_bank((2, 2)).summaries is None  # pooled grids need their own summaries


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parts_merge_into_one_mapped_entry(tmp_path, dtype):
    from faceemd.jobs.extraction import _concat
    from faceemd.memory import shared_file_mapping

    cache = FeatureCache(tmp_path, dtype=dtype, mmap=True)
    written = [(0, _features(n=5, seed=1)), (5, _features(n=3, seed=2))]
    for i, (_, f) in enumerate(written):
        cache.save(f"{i:02d}" * 32, f)
    parts = [((a, a + len(f)), cache.load(f"{i:02d}" * 32)) for i, (a, f) in enumerate(written)]
    cache.save_merged("cd" * 32, [(a, f) for (a, _), f in parts], {"parts": 2})
    whole = cache.load("cd" * 32)  # verify=True: the streamed checksum must match
    assert whole is not None
    reference = _concat(parts)
    for name in ("embeddings", "patches", "index", "landmarks"):
        assert torch.equal(getattr(whole, name), getattr(reference, name)), name
    assert torch.equal(whole.index[5:], written[1][1].index + 5)  # part positions offset
    assert whole.skipped == 2 and whole.grid_shape == (4, 4)
    for got, want in zip(whole.summaries, reference.summaries, strict=True):
        assert torch.equal(got, want)
    assert shared_file_mapping(whole.patches) is not None  # mapped, not copied into memory


# --- cached features trusted no further than they deserve (reliability issue) ---


def test_nan_in_an_entry_is_caught_without_checksum_verification(tmp_path):
    cache = FeatureCache(tmp_path, verify=False)
    path = cache.save("k1", _features())
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    import json

    info = json.loads(data[8:header])["embeddings"]
    start = header + info["data_offsets"][0]
    data[start : start + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))
    assert cache.load("k1") is None  # detected, removed, to be extracted again
    assert not path.exists()


def test_entries_swapped_on_disk_are_not_used(tmp_path):
    cache = FeatureCache(tmp_path, verify=True)
    a, b = cache.save("part-a", _features(seed=1)), cache.save("part-b", _features(seed=2))
    a.write_bytes(b.read_bytes())  # both valid files of equal size, now in the wrong place
    assert cache.load("part-a") is None
    assert cache.load("part-b") is not None


def test_content_hash_key_notices_a_same_size_same_time_replacement(tmp_path):
    import os

    import cv2
    import numpy as np

    from faceemd.data.layouts import ImageFolderFaces

    (tmp_path / "P").mkdir()
    img = tmp_path / "P" / "P_0001.bmp"  # uncompressed: same size whatever the pixels
    cv2.imwrite(str(img), np.zeros((8, 8), np.uint8))
    faces = ImageFolderFaces(tmp_path)
    plain, content = faces.fingerprint(), faces.fingerprint(content_hash=True)
    st = img.stat()
    cv2.imwrite(str(img), np.full((8, 8), 9, np.uint8))
    assert img.stat().st_size == st.st_size
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert faces.fingerprint() == plain  # size and time only: not noticed
    assert faces.fingerprint(content_hash=True) != content


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / "ab").mkdir()
    stale = tmp_path / "ab" / f".abc.safetensors.tmp-{dead}"  # the names atomic_write makes
    live = tmp_path / "ab" / f".abd.safetensors.tmp-{os.getpid()}"
    stale.write_bytes(b"x" * 10)
    live.write_bytes(b"y")
    FeatureCache(tmp_path)
    assert not stale.exists() and live.exists()


def test_sets_loaded_once_per_process_while_their_file_is_unchanged(tmp_path, monkeypatch):
    """memo_mb: the next job of an in-process sweep gets the set without reading it again;
    a rewritten entry (new size or time) is read again, and memo_mb=0 keeps nothing."""
    feats = _features()
    cache = FeatureCache(tmp_path, memo_mb=64)
    path = cache.save("ab" * 32, feats)
    reads = []
    real_read = FeatureCache._read
    monkeypatch.setattr(
        FeatureCache, "_read", lambda self, *a: reads.append(a[0]) or real_read(self, *a)
    )
    first = cache.load("ab" * 32)
    again = FeatureCache(tmp_path, memo_mb=64).load("ab" * 32)  # the next job's cache object
    assert again is first and len(reads) == 1
    other = _features(seed=1)
    cache.save("ab" * 32, other)  # same key rewritten: another file
    os.utime(path, ns=(1, 1))  # and surely another time stamp
    assert torch.equal(cache.load("ab" * 32).patches, other.patches) and len(reads) == 2
    cold = FeatureCache(tmp_path / "cold", memo_mb=0)
    cold.save("cd" * 32, feats)
    cold.load("cd" * 32)
    cold.load("cd" * 32)
    assert len(reads) == 4


def test_memo_keeps_within_its_budget(tmp_path):
    from faceemd.storage.filememo import _KEPT

    _KEPT.clear()
    big = _features(n=64, c=256)  # ~1.1 MB of tensors
    cache = FeatureCache(tmp_path, memo_mb=3)
    for i in range(8):
        cache.save(f"{i:02d}" * 32, big)
        cache.load(f"{i:02d}" * 32)
    sets = [v for (_, tag), v in _KEPT.items() if tag.startswith("features")]
    assert 0 < sum(v[1] for v in sets) <= 3 << 20
    assert 1 < len(sets) < 8
    _KEPT.clear()
