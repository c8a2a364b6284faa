"""Face-set readers and image decoding: folder, flat, CFP and list layouts, damaged and unusual
files, the datamodule that prepares them for a backbone."""

import os

import cv2
import numpy as np
import pytest
import torch

from faceemd.data.datamodule import IdentificationDataModule
from faceemd.data.decoding import read_image
from faceemd.data.errors import BadImageError
from faceemd.data.layouts import CfpFaces, FlatFolderFaces, ImageFolderFaces, ImageListFaces
from faceemd.data.synthetic import SyntheticFaces
from faceemd.data.transforms import FaceInput

from .conftest import write_noise_image


def _write_lfw_tree(root, people=("Ann_A", "Bob_B", "Cy_C"), per=(3, 2, 1)):
    rng = np.random.default_rng(0)
    for name, n in zip(people, per, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            cv2.imwrite(
                str(root / name / f"{name}_{i:04d}.jpg"), rng.integers(0, 255, (40, 30), np.uint8)
            )


def _jpeg(path, shape=(60, 40, 3), seed=0):
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 255, shape, dtype=np.uint8), (7, 7), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return image


def test_folder_reader_labels_min_images_and_empty_folders(tmp_path):
    _write_lfw_tree(tmp_path)
    (tmp_path / "Empty_E").mkdir()
    ds = ImageFolderFaces(tmp_path, min_images_per_identity=2)
    assert ds.label_names() == ["Ann_A"] * 3 + ["Bob_B"] * 2
    assert ds.empty_identities == ["Empty_E"]
    image, name, lmk = ds[0]
    assert image.shape == (40, 30) and name == "Ann_A" and np.isnan(lmk).all()
    with pytest.raises(ValueError, match="no identity folder"):
        ImageFolderFaces(tmp_path, min_images_per_identity=5)


def test_empty_identity_folders_are_reported(tmp_path, caplog):
    _write_lfw_tree(tmp_path)
    (tmp_path / "Empty_E").mkdir()
    with caplog.at_level("WARNING"):
        ImageFolderFaces(tmp_path)
    assert "1 identity folder(s) hold no image" in caplog.text and "Empty_E" in caplog.text


def test_corrupt_image_error_or_skip(tmp_path):
    _write_lfw_tree(tmp_path)
    bad = tmp_path / "Ann_A" / "Ann_A_0002.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="Ann_A_0002.jpg cannot be decoded"):
        ImageFolderFaces(tmp_path)[1]
    dm = IdentificationDataModule(
        ImageFolderFaces(tmp_path, on_bad_image="skip"),
        face_input=FaceInput((16, 12), 1, 127.5, 127.5),
        batch_size=8,
    )
    dm.setup("test")
    (loader,) = dm.test_dataloader()
    batch = next(iter(loader))
    assert batch["skipped"] == 1
    assert batch["image"].shape == (5, 1, 16, 12)
    # labels stay attached to their own images: Ann_A is 0, Bob_B 1, Cy_C 2
    assert batch["label"].tolist() == [0, 0, 1, 1, 2]
    assert batch["index"].tolist() == [0, 2, 3, 4, 5]


def test_truncated_jpeg_is_a_bad_image_in_both_modes(tmp_path):
    _write_lfw_tree(tmp_path)
    bad = tmp_path / "Ann_A" / "Ann_A_0002.jpg"
    _jpeg(bad, (200, 160, 3))
    bad.write_bytes(bad.read_bytes()[:1000])  # libjpeg alone would only warn
    with pytest.raises(BadImageError, match="Ann_A_0002.jpg cannot be decoded"):
        read_image(bad)
    skipping = ImageFolderFaces(tmp_path, on_bad_image="skip")
    assert skipping[skipping.files.index("Ann_A/Ann_A_0002.jpg")] is None


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    pixels = np.zeros((20, 50, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "phone.jpg")
    assert shown.shape == (50, 20, 3)  # upright: portrait
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the band is now on top


def test_16_bit_images_convert_exactly_and_huge_images_are_refused(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [514, 1000, 2000, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), values)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), np.round(values / 257))
    _jpeg(tmp_path / "big.jpg", (120, 100, 3))
    with pytest.raises(BadImageError, match=r"120 pixels, above the limit of 10,000"):
        read_image(tmp_path / "big.jpg", max_pixels=10_000)
    assert read_image(tmp_path / "big.jpg").shape == (120, 100, 3)


def test_image_list_reader(tmp_path):
    _write_lfw_tree(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("Ann_A/Ann_A_0001.jpg,7\nBob_B/Bob_B_0001.jpg,9\n")
    ds = ImageListFaces(tmp_path, lst)
    assert ds.label_names() == ["7", "9"]
    lst.write_text("only_one_field\n")
    with pytest.raises(ValueError, match="expected 'relpath,label'"):
        ImageListFaces(tmp_path, lst)


def test_image_list_refuses_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="image list not found"):
        ImageListFaces(tmp_path, tmp_path / "list.txt")


def test_calfw_style_flat_folder_labels_from_names(tmp_path):
    for stem in ("Ann_Lee_0001", "Ann_Lee_0002", "Bo_0001"):
        write_noise_image(tmp_path / f"{stem}.jpg")
    faces = FlatFolderFaces(tmp_path, "lfw")
    assert faces.label_names() == ["Ann_Lee", "Ann_Lee", "Bo"]
    assert faces.summary() == {"images": 3, "identities": 2, "singletons": 1}
    assert FlatFolderFaces(tmp_path, "lfw", min_images_per_identity=2).label_names() == [
        "Ann_Lee",
        "Ann_Lee",
    ]


def test_mlfw_suffix_and_pairs_file_restrict_the_set(tmp_path):
    for stem in ("Ann_Lee_0001_0000", "Ann_Lee_0002_0001", "Bo_0001_0003", "Cy_0001_0000"):
        write_noise_image(tmp_path / "img" / f"{stem}.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "Ann_Lee_0001_0000.jpg Ann_Lee_0002_0001.jpg 1\nAnn_Lee_0001_0000.jpg Bo_0001_0003.jpg 0\n"
    )
    faces = FlatFolderFaces(tmp_path / "img", "lfw", pairs_file=pairs)
    assert faces.files == ["Ann_Lee_0001_0000.jpg", "Ann_Lee_0002_0001.jpg", "Bo_0001_0003.jpg"]
    assert faces.label_names() == ["Ann_Lee", "Ann_Lee", "Bo"]
    with pytest.raises(FileNotFoundError, match="pair file not found"):
        FlatFolderFaces(tmp_path / "img", "lfw", pairs_file=tmp_path / "nope.txt")
    pairs.write_text("Zed_0001_0000.jpg Bo_0001_0003.jpg 0\n")
    with pytest.raises(BadImageError, match="Zed_0001_0000.jpg"):
        FlatFolderFaces(tmp_path / "img", "lfw", pairs_file=pairs)


def test_agedb_names_and_bad_names(tmp_path):
    for stem in ("0_MariaCallas_35_f", "1_MariaCallas_62_f", "12_Bob_Hope_80_m"):
        write_noise_image(tmp_path / f"{stem}.jpg")
    # files in name order: 0_..., 12_..., 1_...
    assert FlatFolderFaces(tmp_path, "agedb").label_names() == [
        "MariaCallas",
        "Bob_Hope",
        "MariaCallas",
    ]
    write_noise_image(tmp_path / "random.jpg")
    with pytest.raises(ValueError, match="random.jpg"):
        FlatFolderFaces(tmp_path, "agedb")


def test_duplicate_stems_are_refused(tmp_path):
    write_noise_image(tmp_path / "Ann_0001.jpg")
    write_noise_image(tmp_path / "Ann_0001.png")
    with pytest.raises(ValueError, match="duplicate image name"):
        FlatFolderFaces(tmp_path, "lfw")


def test_cfp_frontal_and_profile(tmp_path):
    for ident in ("001", "002"):
        for i in range(1, 4):
            write_noise_image(tmp_path / "Data" / "Images" / ident / "frontal" / f"{i:02d}.jpg")
        write_noise_image(tmp_path / "Data" / "Images" / ident / "profile" / "01.jpg")
    frontal, profile = CfpFaces(tmp_path, "frontal"), CfpFaces(tmp_path, "profile")
    assert len(frontal) == 6 and len(profile) == 2
    assert profile.label_names() == ["001", "002"]
    assert profile[0][0].shape == (24, 20)
    with pytest.raises(FileNotFoundError, match="CFP root"):
        CfpFaces(tmp_path / "Data", "frontal")


def test_datamodule_shares_vocabulary_and_prepares_inputs():
    dm = IdentificationDataModule(
        SyntheticFaces(3, 1, first_image=1, occlusion="mask"),
        SyntheticFaces(3, 2),
        face_input=FaceInput((112, 96), 3, 127.5, 128.0),
        batch_size=4,
    )
    dm.setup("test")
    q_loader, g_loader = dm.test_dataloader()
    q = next(iter(q_loader))
    assert q["image"].shape == (3, 3, 112, 96)
    assert torch.equal(q["image"][:, 0], q["image"][:, 1])  # grayscale copied to 3 channels
    assert float(q["image"].abs().max()) <= 1.0
    assert q["landmarks"].shape == (3, 68, 2)
    assert float(q["landmarks"][..., 0].max()) < 96
    g = torch.cat([b["label"] for b in g_loader])
    assert g.tolist() == [0, 0, 1, 1, 2, 2] and q["label"].tolist() == [0, 1, 2]


def test_parsed_files_are_reused_only_while_unchanged(tmp_path):
    """A landmark table is parsed once per process while unchanged; an edit (same size), an
    append or an atomic replace is seen by the next read, and a caller's edits of the returned
    dict do not reach the next caller."""
    import os

    from faceemd.data.faceset import read_landmarks
    from faceemd.storage.manifest import Manifest

    tsv = tmp_path / "landmarks68.tsv"
    tsv.write_text("a/1.png\t1\t2\t3\t4\n")
    first = read_landmarks(tsv)
    np.testing.assert_array_equal(first["a/1.png"], [[1, 2], [3, 4]])
    first["b/2.png"] = np.zeros((2, 2), np.float32)
    assert list(read_landmarks(tsv)) == ["a/1.png"]
    with pytest.raises(ValueError):
        first["a/1.png"][0, 0] = 9.0  # shared arrays are read-only
    stamp = tsv.stat()
    tsv.write_text("a/1.png\t5\t6\t7\t8\n")  # same size; its time moves on
    os.utime(tsv, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
    np.testing.assert_array_equal(read_landmarks(tsv)["a/1.png"], [[5, 6], [7, 8]])
    with open(tsv, "a") as fh:
        fh.write("c/3.png\t0\t0\t1\t1\n")
    assert sorted(read_landmarks(tsv)) == ["a/1.png", "c/3.png"]
    replacement = tmp_path / "new.tsv"
    replacement.write_text("d/4.png\t1\t1\t2\t2\n")
    os.replace(replacement, tsv)
    assert list(read_landmarks(tsv)) == ["d/4.png"]

    # a manifest: lines appended by one instance are seen by the next
    (tmp_path / "x.png").write_bytes(b"")
    with Manifest(tmp_path) as manifest:
        manifest.record({"rel": "x.png", "status": "ok"})
    assert list(Manifest(tmp_path).done) == ["x.png"]
    with Manifest(tmp_path) as manifest:
        manifest.record({"rel": "y.png", "status": "skipped", "reason": "no face"})
    assert sorted(Manifest(tmp_path).done) == ["x.png", "y.png"]


def test_self_referencing_symlink_is_a_bad_image_not_a_stopped_set(tmp_path):
    """x.jpg -> x.jpg used to stop the whole listing with OSError 40 (file unnamed)."""
    write_noise_image(tmp_path / "Ann" / "Ann_0001.jpg")
    write_noise_image(tmp_path / "Ann" / "Ann_0002.jpg", seed=1)
    os.symlink("Ann_0003.jpg", tmp_path / "Ann" / "Ann_0003.jpg")
    faces = ImageFolderFaces(tmp_path)
    assert faces.files == ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Ann/Ann_0003.jpg"]
    with pytest.raises(BadImageError, match=r"Ann_0003\.jpg is a symbolic link that loops"):
        faces[2]
    skipping = ImageFolderFaces(tmp_path, on_bad_image="skip")
    assert skipping[2] is None and skipping[0] is not None
