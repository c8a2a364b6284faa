"""Dataset readers per distributed layout, materialised occluded sets, landmarks, alignment."""

import json

import cv2
import numpy as np
import pytest

from faceemd.data.align import TEMPLATES, align_face, align_folder, five_points, umeyama
from faceemd.data.folders import BadImageError, CfpFaces, FlatFolderFaces, ImageListFaces
from faceemd.data.occluded import OccludedFaces
from faceemd.data.synthetic import SyntheticFaces

from .conftest import SHARED

LFW_RAW = SHARED / "data" / "lfw" / "raw-sample"
PFLD = SHARED / "weights" / "pfld_68.onnx"
needs_raw = pytest.mark.skipif(not LFW_RAW.is_dir(), reason="../shared raw-sample not present")
needs_pfld = pytest.mark.skipif(not PFLD.is_file(), reason="../shared/weights/pfld_68.onnx absent")


def _img(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (24, 20), np.uint8))


def test_calfw_style_flat_folder_labels_from_names(tmp_path):
    for stem in ("Ann_Lee_0001", "Ann_Lee_0002", "Bo_0001"):
        _img(tmp_path / f"{stem}.jpg")
    faces = FlatFolderFaces(tmp_path, "lfw")
    assert faces.label_names() == ["Ann_Lee", "Ann_Lee", "Bo"]
    assert faces.summary() == {"images": 3, "identities": 2, "singletons": 1}
    assert FlatFolderFaces(tmp_path, "lfw", min_images_per_identity=2).label_names() == [
        "Ann_Lee",
        "Ann_Lee",
    ]


def test_mlfw_suffix_and_pairs_file_restrict_the_set(tmp_path):
    for stem in ("Ann_Lee_0001_0000", "Ann_Lee_0002_0001", "Bo_0001_0003", "Cy_0001_0000"):
        _img(tmp_path / "img" / f"{stem}.jpg")
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
        _img(tmp_path / f"{stem}.jpg")
    # files in name order: 0_..., 12_..., 1_...
    assert FlatFolderFaces(tmp_path, "agedb").label_names() == [
        "MariaCallas",
        "Bob_Hope",
        "MariaCallas",
    ]
    _img(tmp_path / "random.jpg")
    with pytest.raises(ValueError, match="random.jpg"):
        FlatFolderFaces(tmp_path, "agedb")


def test_duplicate_stems_are_refused(tmp_path):
    _img(tmp_path / "Ann_0001.jpg")
    _img(tmp_path / "Ann_0001.png")
    with pytest.raises(ValueError, match="duplicate image name"):
        FlatFolderFaces(tmp_path, "lfw")


def test_cfp_frontal_and_profile(tmp_path):
    for ident in ("001", "002"):
        for i in range(1, 4):
            _img(tmp_path / "Data" / "Images" / ident / "frontal" / f"{i:02d}.jpg")
        _img(tmp_path / "Data" / "Images" / ident / "profile" / "01.jpg")
    frontal, profile = CfpFaces(tmp_path, "frontal"), CfpFaces(tmp_path, "profile")
    assert len(frontal) == 6 and len(profile) == 2
    assert profile.label_names() == ["001", "002"]
    assert profile[0][0].shape == (24, 20)
    with pytest.raises(FileNotFoundError, match="CFP root"):
        CfpFaces(tmp_path / "Data", "frontal")


def test_image_list_refuses_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="image list not found"):
        ImageListFaces(tmp_path, tmp_path / "list.txt")


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
    a.manifest_path.write_text("\n".join(lines[:4]) + '\n{"rel": "synth_00')
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
    with pytest.raises(ValueError, match="no occluded image"):
        OccludedFaces(NoLandmarks(), "mask", tmp_path / "s", on_bad_image="skip")
    (folder,) = (tmp_path / "s").iterdir()
    entries = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["skipped", "skipped"]
    # crops need no landmarks
    assert len(OccludedFaces(NoLandmarks(), "crop", tmp_path / "c")) == 2


def test_umeyama_recovers_a_known_similarity():
    src = np.array(TEMPLATES["sphereface_112x96"].points)
    angle, scale, shift = np.deg2rad(17), 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    m = umeyama(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_align_face_puts_the_five_points_on_the_template():
    image = np.zeros((200, 200), np.uint8)
    pts = np.array([[70, 90], [130, 85], [100, 120], [78, 150], [124, 146]], float)
    for x, y in pts:
        cv2.circle(image, (int(x), int(y)), 3, 255, -1)
    aligned, m = align_face(image, pts, "arcface_128")
    assert aligned.shape == (128, 128)
    mapped = pts @ m[:, :2].T + m[:, 2]
    template = np.array(TEMPLATES["arcface_128"].points) * 128 / 160
    # least squares over 5 non-similar points: residual of a few pixels, not exact
    assert np.abs(mapped - template).max() < 6
    for x, y in mapped:  # the drawn dots land where the transform says
        assert aligned[int(round(y)), int(round(x))] > 100


@needs_raw
def test_align_command_on_raw_sample_matches_shared_aligned_faces(tmp_path):
    from faceemd.data.folders import read_image

    counts = align_folder(LFW_RAW, tmp_path, "sphereface_112x96")
    assert counts == {"aligned": 40, "reused": 0, "skipped": 0}
    ref_root = SHARED / "data" / "lfw" / "align-112x96"
    diffs = []
    for path in sorted(tmp_path.glob("*/*.jpg")):
        ours = read_image(path).astype(float)
        ref = read_image(ref_root / path.relative_to(tmp_path)).astype(float)
        assert ours.shape == ref.shape == (112, 96)
        diffs.append(np.abs(ours - ref).mean())
    # the shared set was aligned from the 350 px originals, ours from the 250 px sample with the
    # same 5 points: resampling differences only (median measured 2.8 grey levels)
    assert len(diffs) == 40 and np.median(diffs) < 6 and max(diffs) < 12
    assert align_folder(LFW_RAW, tmp_path, "sphereface_112x96") == {
        "aligned": 0,
        "reused": 40,
        "skipped": 0,
    }
    tsv = (tmp_path / "landmarks68.tsv").read_text().splitlines()
    assert len(tsv) == 40 and len(tsv[0].split("\t")) == 137


@needs_pfld
def test_onnx_landmarks_agree_with_the_distributed_annotations():
    from faceemd.data.folders import read_image, read_landmarks
    from faceemd.data.landmarks import OnnxLandmarker

    root = SHARED / "data" / "lfw" / "align-112x96"
    truth = read_landmarks(root / "landmarks68.tsv")
    detector = OnnxLandmarker(PFLD)
    errors = []
    for rel in list(truth)[:20]:
        found = detector(read_image(root / rel))
        t = truth[rel]
        eye = np.linalg.norm(t[42:48].mean(0) - t[36:42].mean(0))
        errors.append(np.linalg.norm(found - t, axis=1).mean() / eye)
    # same model, different crop and frame: normalised mean error ~2.5% of the eye distance
    assert np.median(errors) < 0.06, errors
    assert five_points(found).shape == (5, 2)


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
    from faceemd.data.folders import ImageFolderFaces
    from faceemd.data.train_datamodule import TrainFaces
    from faceemd.data.transforms import FaceInput

    _img(tmp_path / "orig" / "Ann" / "Ann_0001.jpg", seed=1)
    (tmp_path / "masked" / "Ann").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "masked" / "Ann" / "Ann_0001.jpg"), np.zeros((24, 20), np.uint8))
    faces = ImageFolderFaces(tmp_path / "orig")
    spec = FaceInput((24, 20), 1, 0.0, 1.0)
    always = TrainFaces(faces, {"Ann": 0}, spec, None, str(tmp_path / "masked"), p_masked_copy=1.0)
    never = TrainFaces(faces, {"Ann": 0}, spec, None, str(tmp_path / "masked"), p_masked_copy=0.0)
    assert float(always[0]["image"].abs().max()) == 0.0
    assert float(never[0]["image"].abs().max()) > 0.0 and never[0]["label"] == 0


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


def test_align_refuses_a_destination_overlapping_the_source(tmp_path):
    (tmp_path / "src" / "P").mkdir(parents=True)
    for dst in (tmp_path / "src", tmp_path / "src" / "aligned", tmp_path):
        with pytest.raises(ValueError, match="overlaps the source"):
            align_folder(tmp_path / "src", dst)
