"""Synthetic faces and occluders: masks, sunglasses and crops placed from landmarks, occluded
query sets materialised once and resumed, the training-time albumentations occluder."""

import json

import cv2
import numpy as np
import pytest

from faceemd.data.layouts import ImageFolderFaces, ImageListFaces
from faceemd.data.occluded import OccludedFaces
from faceemd.data.occlusion import random_crop
from faceemd.data.synthetic import SyntheticFaces
from faceemd.data.transforms import FaceInput

from .conftest import write_noise_image


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticFaces(3, 2, seed=1), SyntheticFaces(3, 2, seed=1)
    img, name, lmk = a[3]
    assert img.shape == (128, 128) and img.dtype == np.uint8 and lmk.shape == (68, 2)
    assert np.array_equal(img, b[3][0])
    assert name == "synth1_0001" == a.label_names()[3]
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


@pytest.mark.parametrize("occlusion", ["mask", "sunglasses", "crop"])
def test_occluded_set_is_deterministic_and_resumes(tmp_path, occlusion):
    source = SyntheticFaces(3, 2, seed=5)
    a = OccludedFaces(source, occlusion, tmp_path / "a", seed=1)
    b = OccludedFaces(source, occlusion, tmp_path / "b", seed=1)
    assert len(a) == 6 and a.label_names() == source.label_names()
    for i in range(6):
        assert np.array_equal(a[i][0], b[i][0])  # same seed, same pixels (PNG is lossless)
    assert not np.array_equal(a[0][0], source[0][0])
    lines = a.manifest_path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["status"] == "ok" for x in lines)
    # a killed run: drop the last two images and a half-written manifest line, then rerun
    for rel in a.files[-2:]:
        (a.root / rel).unlink()
    a.manifest_path.write_text("\n".join(lines[:4]) + '\n{"rel": "synth0_00')
    before = {rel: (a.root / rel).stat().st_mtime_ns for rel in a.files[:4]}
    again = OccludedFaces(source, occlusion, tmp_path / "a", seed=1)
    assert {rel: (again.root / rel).stat().st_mtime_ns for rel in a.files[:4]} == before
    for i in range(6):
        assert np.array_equal(again[i][0], b[i][0])
    assert OccludedFaces(source, occlusion, tmp_path / "a", seed=2).root != a.root


def test_occlusion_without_landmarks_errors_or_is_skip_listed(tmp_path):
    class NoLandmarks:
        files = ["p/x.png", "p/y.png"]

        def __len__(self):
            return 2

        def label_names(self):
            return ["p", "p"]

        def fingerprint(self):
            return {"type": "nolmk"}

        def __getitem__(self, i):
            return np.zeros((32, 32), np.uint8), "p", np.full((68, 2), np.nan, np.float32)

    with pytest.raises(ValueError, match="no landmark annotation"):
        OccludedFaces(NoLandmarks(), "mask", tmp_path / "e")
    with pytest.raises(ValueError, match="no image could be made"):
        OccludedFaces(NoLandmarks(), "mask", tmp_path / "s", on_bad_image="skip")
    (folder,) = (tmp_path / "s").iterdir()
    entries = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["skipped", "skipped"]
    # crops need no landmarks
    assert len(OccludedFaces(NoLandmarks(), "crop", tmp_path / "c")) == 2


def test_occluded_copies_of_absolute_list_entries_stay_in_their_folder(tmp_path):
    """An image list naming files by absolute path (or with ..): the masked copies are
    written inside the occluded set's folder and the originals keep their bytes."""
    people = tmp_path / "faces"
    source_set = SyntheticFaces(2, 2, seed=3)
    lines = []
    for i in range(len(source_set)):
        image, name, lmk = source_set[i]
        path = people / name / f"{name}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image)
        entry = str(path) if i % 2 == 0 else f"../faces/{name}/{path.name}"
        lines.append(f"{entry},{name}")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text("\n".join(lines) + "\n")
    before = {p: p.read_bytes() for p in people.rglob("*.png")}
    source = ImageListFaces(tmp_path / "lists", tmp_path / "lists" / "list.txt")
    occluded = OccludedFaces(source, "crop", tmp_path / "out", seed=0)
    assert len(occluded) == 4
    assert {p: p.read_bytes() for p in people.rglob("*.png")} == before
    written = [occluded.root / rel for rel in occluded.files]
    assert all(p.is_file() and p.resolve().is_relative_to(occluded.root.resolve()) for p in written)


def test_albumentations_occluder_masks_mouth_and_moves_keypoints():
    from faceemd.data.augment import build_augment

    image, _, lmk = SyntheticFaces(1, 1, seed=4)[0]
    masked = build_augment(p_occlusion=1.0, kinds=["mask"], p_flip=0, p_jitter=0, seed=0)(
        image=image, keypoints=lmk
    )
    changed = masked["image"].astype(int) != image
    mouth = lmk[48:68].mean(0).round().astype(int)
    eye = lmk[36:42].mean(0).round().astype(int)
    assert changed[mouth[1], mouth[0]] and not changed[eye[1], eye[0]]
    np.testing.assert_allclose(masked["keypoints"], lmk, atol=1e-4)  # overlays keep the points
    cropped = build_augment(p_occlusion=1.0, kinds=["crop"], p_flip=0, p_jitter=0, seed=0)(
        image=image, keypoints=lmk
    )
    # a 70% window resized back magnifies distances by 1/0.7
    span = np.ptp(np.asarray(cropped["keypoints"])[:, 0])
    assert span == pytest.approx(np.ptp(lmk[:, 0]) * 128 / round(128 * 0.7), rel=1e-3)
    flipped = build_augment(p_occlusion=0, p_flip=1.0, p_jitter=0, seed=0)(
        image=image, keypoints=lmk
    )
    pts = np.asarray(flipped["keypoints"])
    # after mirroring, point 36 (image-left eye corner) is the mirror of old point 45
    assert pts[36, 0] == pytest.approx(128 - 1 - lmk[45, 0], abs=1.01)
    assert np.array_equal(flipped["image"], image[:, ::-1])


def test_train_faces_use_precomputed_masked_copies(tmp_path):
    from faceemd.data.train_datamodule import TrainFaces

    write_noise_image(tmp_path / "orig" / "Ann" / "Ann_0001.jpg", seed=1)
    (tmp_path / "masked" / "Ann").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "masked" / "Ann" / "Ann_0001.jpg"), np.zeros((24, 20), np.uint8))
    faces = ImageFolderFaces(tmp_path / "orig")
    spec = FaceInput((24, 20), 1, 0.0, 1.0)
    always = TrainFaces(faces, {"Ann": 0}, spec, None, str(tmp_path / "masked"), p_masked_copy=1.0)
    never = TrainFaces(faces, {"Ann": 0}, spec, None, str(tmp_path / "masked"), p_masked_copy=0.0)
    assert float(always[0]["image"].abs().max()) == 0.0
    assert float(never[0]["image"].abs().max()) > 0.0 and never[0]["label"] == 0


def test_photos_differing_only_in_suffix_stay_two_images(tmp_path):
    """Alec_Baldwin_0001.jpg and Alec_Baldwin_0001.png in one folder used to become one made
    image (both written to Alec_Baldwin_0001.png), so two queries were ranked from one face."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "src" / "Alec_Baldwin"
    folder.mkdir(parents=True)
    for name in ("Alec_Baldwin_0001.jpg", "Alec_Baldwin_0001.png", "Alec_Baldwin_0002.jpg"):
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (40, 32), np.uint8))
    source = ImageFolderFaces(tmp_path / "src")
    made = OccludedFaces(source, "crop", tmp_path / "out")
    assert len(made) == 3 and len(set(made.files)) == 3
    assert len(list(made.root.rglob("*.png"))) == 3
    assert not np.array_equal(made[0][0], made[1][0])  # each made from its own photo
    assert "Alec_Baldwin/Alec_Baldwin_0002.png" in made.files  # no clash: name unchanged


def test_two_runs_making_one_set_at_once_share_the_work(tmp_path):
    """Two processes start the same made set together: one writes the images while the other
    waits, then reuses them; the manifest has one line per image."""
    import subprocess
    import sys

    from .conftest import ROOT

    for k in range(12):
        write_noise_image(tmp_path / "src" / f"P{k % 3}" / f"P{k % 3}_{k:04d}.jpg", seed=k)
    code = (f"from tests.helpers import make_slow_copies; "
            f"make_slow_copies({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r})")  # fmt: skip
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["12", "12"]
    (manifest,) = (tmp_path / "out").glob("slow-*/manifest.jsonl")
    rels = [json.loads(line)["rel"] for line in manifest.read_text().splitlines()]
    assert len(rels) == 12 and len(set(rels)) == 12
    assert sum("waiting for it to finish" in err for _, err in outputs) == 1
