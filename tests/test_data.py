"""Face sets, occlusions and the identification datamodule on generated data."""

import cv2
import numpy as np
import pytest
import torch

from faceemd.data.datamodule import IdentificationDataModule
from faceemd.data.folders import BadImageError, ImageFolderFaces, ImageListFaces, read_image
from faceemd.data.occlusion import random_crop
from faceemd.data.synthetic import SyntheticFaces
from faceemd.data.transforms import FaceInput


def _write_lfw_tree(root, people=("Ann_A", "Bob_B", "Cy_C"), per=(3, 2, 1)):
    rng = np.random.default_rng(0)
    for name, n in zip(people, per, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            cv2.imwrite(
                str(root / name / f"{name}_{i:04d}.jpg"), rng.integers(0, 255, (40, 30), np.uint8)
            )


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticFaces(3, 2, seed=1), SyntheticFaces(3, 2, seed=1)
    img, name, lmk = a[3]
    assert img.shape == (128, 128) and img.dtype == np.uint8 and lmk.shape == (68, 2)
    assert np.array_equal(img, b[3][0])
    assert name == "synth_0001" == a.label_names()[3]
    assert not np.array_equal(img, SyntheticFaces(3, 2, seed=2)[3][0])


def test_mask_covers_mouth_not_eyes_and_sunglasses_cover_eyes():
    clean = SyntheticFaces(4, 1, occlusion="none", seed=3)
    masked = SyntheticFaces(4, 1, occlusion="mask", seed=3)
    glasses = SyntheticFaces(4, 1, occlusion="sunglasses", seed=3)
    for i in range(4):
        c, _, lmk = clean[i]
        changed_mask = masked[i][0].astype(int) != c
        mouth = lmk[48:68].mean(0).round().astype(int)
        nose_tip = lmk[30].round().astype(int)
        eye = lmk[36:42].mean(0).round().astype(int)
        assert changed_mask[mouth[1], mouth[0]] and changed_mask[nose_tip[1], nose_tip[0]]
        assert not changed_mask[eye[1], eye[0]]
        # lenses are dark (shade < 40) over the whole eye, whatever the eye looked like
        lens = glasses[i][0][eye[1] - 2 : eye[1] + 3, eye[0] - 4 : eye[0] + 5]
        assert int(lens.max()) < 45


def test_crop_keeps_seventy_percent_and_maps_landmarks():
    img = np.zeros((100, 100), np.uint8)
    img[50, 50] = 255
    out, lmk = random_crop(img, np.array([[50.0, 50.0]]), np.random.default_rng(0), 0.7)
    assert out.shape == (100, 100)
    y, x = np.unravel_index(out.argmax(), out.shape)
    assert abs(x - lmk[0, 0]) <= 1.5 and abs(y - lmk[0, 1]) <= 1.5


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


def test_image_list_reader(tmp_path):
    _write_lfw_tree(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("Ann_A/Ann_A_0001.jpg,7\nBob_B/Bob_B_0001.jpg,9\n")
    ds = ImageListFaces(tmp_path, lst)
    assert ds.label_names() == ["7", "9"]
    lst.write_text("only_one_field\n")
    with pytest.raises(ValueError, match="expected 'relpath,label'"):
        ImageListFaces(tmp_path, lst)


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


# --- damaged and unusual image files (reliability issue) ---


def _jpeg(path, shape=(60, 40, 3), seed=0):
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 255, shape, dtype=np.uint8), (7, 7), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return image


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


def test_empty_identity_folders_are_reported(tmp_path, caplog):
    _write_lfw_tree(tmp_path)
    (tmp_path / "Empty_E").mkdir()
    with caplog.at_level("WARNING"):
        ImageFolderFaces(tmp_path)
    assert "1 identity folder(s) hold no image" in caplog.text and "Empty_E" in caplog.text
