"""Adversarial query sets: the attack's budget and objective, batch independence, the set's
recipe key (rebuilt when it changes, reused when not), resumption, and a clear error for a
surrogate that cannot be differentiated."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from faceemd.data.adversarial import AdversarialFaces
from faceemd.data.attack import AttackSettings, DifferentiableInput, dodge, random_start
from faceemd.data.synthetic import SyntheticFaces
from faceemd.data.transforms import FaceInput
from faceemd.models.backbones import TinyFaceNet

TINY = {
    "name": "tiny_cnn",
    "net": {"_target_": "faceemd.models.backbones.TinyFaceNet"},
    "weights": None,
    "input": {"size": [64, 64], "channels": 1, "mean": 127.5, "std": 127.5, "template": None},
}


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyFaceNet().eval().requires_grad_(False)


def _prepare():
    return DifferentiableInput(FaceInput((64, 64), 1, 127.5, 127.5))


def _faces(n=6, seed=0):
    faces = SyntheticFaces(num_identities=3, images_per_identity=n // 3, seed=seed)
    return torch.from_numpy(np.stack([faces[i][0] for i in range(n)])).unsqueeze(1)


def _start(images, seed=0):
    return torch.stack(
        [random_start(tuple(images.shape[1:]), seed, f"{i}") for i in range(len(images))]
    )


def _dodging_loss(model, prepare, clean, other):
    with torch.no_grad():
        a = F.normalize(model(prepare(clean.float())).embedding, dim=1)
        b = F.normalize(model(prepare(other.float())).embedding, dim=1)
    return 1 - (a * b).sum(1)


@pytest.mark.parametrize("method", ["mifgsm", "pgd"])
def test_attack_respects_the_budget_pixel_by_pixel_and_beats_random_noise(method):
    model, prepare, images = _model(), _prepare(), _faces()
    settings = AttackSettings(method=method, eps_levels=4, steps=5, step_levels=1.5)
    adv, stats = dodge(model, prepare, images, _start(images), settings)
    assert adv.dtype == torch.uint8 and adv.shape == images.shape
    diff = adv.long() - images.long()
    assert int(diff.abs().max()) <= 4  # whole levels: exact, no tolerance
    assert int(diff.abs().max()) == 4  # and the budget is used
    torch.testing.assert_close(stats["linf"], diff.flatten(1).abs().amax(1).float())
    torch.testing.assert_close(stats["l2"], diff.flatten(1).float().norm(dim=1))
    # the same budget spent on random signs raises the dodging loss far less
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, images.shape, generator=g) * 2 - 1
    noisy = (images.long() + 4 * signs).clamp(0, 255).to(torch.uint8)
    attacked = _dodging_loss(model, prepare, images, adv)
    random = _dodging_loss(model, prepare, images, noisy)
    assert (attacked > 2 * random).all(), (attacked, random)
    torch.testing.assert_close(stats["cos_after"], 1 - attacked, atol=1e-5, rtol=0)


def test_perturbation_does_not_depend_on_the_batch():
    """In float64 (float32's batched and single convolutions round differently, see
    faceemd.data.attack); a surrogate with batch statistics would fail this by far."""
    model, prepare, images = _model().double(), _prepare(), _faces()
    settings = AttackSettings(eps_levels=8, steps=4)
    start = _start(images)
    together, _ = dodge(model, prepare, images, start, settings)
    for i in range(len(images)):
        alone, _ = dodge(model, prepare, images[i : i + 1], start[i : i + 1], settings)
        assert torch.equal(alone[0], together[i]), f"image {i} differs alone vs in a batch"


def test_surrogate_in_training_mode_is_refused():
    model = TinyFaceNet().train()
    with pytest.raises(ValueError, match="eval mode"):
        images = _faces(3)
        dodge(model, _prepare(), images, _start(images), AttackSettings())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="eps_levels must be a whole number"):
        AttackSettings(eps_levels=0.03)
    with pytest.raises(ValueError, match="attack method"):
        AttackSettings(method="cw")


def test_differentiable_input_matches_the_numpy_transform():
    """The warp from LFW's 112x96 frame into ArcFace's 112x112 (8 black columns each side)
    and the grey -> 3 channel copy, as FaceInput does them with OpenCV."""
    spec = FaceInput((112, 112), 3, 127.5, 128.0, template="arcface_112").in_frame(
        "sphereface_112x96"
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (112, 96), np.uint8)
    expected, _ = spec(image, np.zeros((68, 2), np.float32))
    got = DifferentiableInput(spec)(torch.from_numpy(image).float()[None, None])[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _set(tmp_path, source, precision="float32", **attack):
    settings = {"eps_levels": 8, "steps": 2, **attack}
    torch.manual_seed(0)  # the tiny surrogate's weights (a new draw would be another recipe)
    out = tmp_path / "adv"
    return AdversarialFaces(source, TINY, out, settings, batch_size=4, precision=precision)


def test_set_is_reused_when_its_recipe_is_the_same_and_rebuilt_when_it_changes(tmp_path):
    source = SyntheticFaces(num_identities=3, images_per_identity=3)
    first = _set(tmp_path, source)
    assert len(first) == 9 and not first.skip_list
    stamps = {rel: (first.root / rel).stat().st_mtime_ns for rel in first.files}
    again = _set(tmp_path, source)
    assert again.root == first.root
    assert {rel: (again.root / rel).stat().st_mtime_ns for rel in again.files} == stamps
    other = _set(tmp_path, source, eps_levels=4)
    assert other.root != first.root
    for i, rel in enumerate(other.files):  # within its own budget, image by image
        clean = source[i][0].astype(int)
        assert np.abs(other[i][0].astype(int) - clean).max() <= 4, rel
    summary = other.attack_summary()
    assert summary["linf_max"] <= 4 and summary["eps_levels"] == 4
    # the manifest records each image's actual norms
    lines = [json.loads(x) for x in other.manifest_path.read_text().splitlines()]
    for line in lines:
        rel = line["rel"]
        i = other.files.index(rel)
        delta = other[i][0].astype(float) - source[i][0].astype(float)
        assert line["linf"] == int(np.abs(delta).max())
        assert line["l2"] == pytest.approx(np.linalg.norm(delta), abs=1e-3)


def test_killed_generation_resumes_where_it_stopped(tmp_path):
    """In float64, where an image's result does not depend on its batch (the resumed run
    batches the rest differently)."""
    source = SyntheticFaces(num_identities=3, images_per_identity=3)
    full = _set(tmp_path / "a", source, "float64")
    expected = [full[i][0] for i in range(len(full))]
    # a run killed after 5 images: 5 manifest lines and a half-written sixth
    killed = _set(tmp_path / "b", source, "float64")
    lines = killed.manifest_path.read_text().splitlines()
    for rel in killed.files[5:]:
        (killed.root / rel).unlink()
    killed.manifest_path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    kept = {rel: (killed.root / rel).stat().st_mtime_ns for rel in killed.files[:5]}
    resumed = _set(tmp_path / "b", source, "float64")
    assert {rel: (resumed.root / rel).stat().st_mtime_ns for rel in resumed.files[:5]} == kept
    for i in range(len(resumed)):
        assert np.array_equal(resumed[i][0], expected[i])


def test_onnx_surrogate_gets_a_clear_error(compose_evaluate, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_evaluate(["data=lfw_adv", "backbone@data.query.surrogate=sface"])
    surrogate = instantiate(OmegaConf.create({"s": cfg.data.query.surrogate}))["s"]
    source = SyntheticFaces(num_identities=2, images_per_identity=2)
    with pytest.raises(ValueError, match="cannot be differentiated.*mobilefacenet"):
        AdversarialFaces(source, surrogate, tmp_path)


def test_own_originals_map_each_query_to_its_clean_file(tmp_path):
    """exclude_own_original: the gallery position of each adversarial query's source file."""
    import cv2

    from faceemd.data.datamodule import IdentificationDataModule
    from faceemd.data.layouts import ImageFolderFaces

    faces = SyntheticFaces(num_identities=3, images_per_identity=4)
    for i in range(len(faces)):
        image, name, _ = faces[i]
        (tmp_path / "lfw" / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "lfw" / name / f"{name}_{i:04d}.png"), image)
    source = ImageFolderFaces(tmp_path / "lfw", max_images_per_identity=2)
    gallery = ImageFolderFaces(tmp_path / "lfw")
    assert len(source) == 6 and len(gallery) == 12
    query = _set(tmp_path, source)
    spec = FaceInput((64, 64), 1, 127.5, 127.5)
    kept = IdentificationDataModule(query, gallery, spec).own_originals()
    assert kept is None  # the paper's protocol: originals stay in the gallery
    dm = IdentificationDataModule(query, gallery, spec, exclude_own_original=True)
    rows = dm.own_originals()
    assert [gallery.files[r] for r in rows] == [source.files[s] for s in query.source_index]
    with pytest.raises(ValueError, match="made image by image from the gallery"):
        IdentificationDataModule(gallery, gallery, spec, exclude_own_original=True).own_originals()


def test_lfw_adv_config_on_a_generated_tree(compose_evaluate, tmp_path):
    """data=lfw_adv as composed: each person's first 3 faces attacked, the full folder as
    gallery, the surrogate chosen apart from the evaluated backbone."""
    import cv2
    from hydra.utils import instantiate

    from faceemd.models.build import build_face_input

    faces = SyntheticFaces(num_identities=3, images_per_identity=4)
    for i in range(len(faces)):
        image, name, _ = faces[i]
        (tmp_path / "lfw" / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "lfw" / name / f"{name}_{i:04d}.png"), image)
    cfg = compose_evaluate([
        "data=lfw_adv", "backbone@data.query.surrogate=tiny_cnn", "data.query.attack.steps=1",
        f"paths.lfw_dir={tmp_path / 'lfw'}", f"paths.adversarial_dir={tmp_path / 'adv'}",
    ])  # fmt: skip
    assert cfg.backbone.name == "sface" and cfg.data.query.surrogate.name == "tiny_cnn"
    dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    dm.setup("test")
    assert len(dm.query) == 9 and len(dm.gallery) == 12
    assert dm.query.attack_summary()["linf_max"] <= 8


def test_per_channel_mean_and_std_follow_the_channel_order():
    """input.mean / input.std as one number per channel (model-card style), in the input's
    channel order (BGR for colour: bgr), for the numpy and the torch transform alike."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 6, 3), np.uint8)
    mean, std = [122.782, 117.001, 104.298], [58.0, 57.0, 56.0]
    for colour in ("rgb", "bgr"):
        spec = FaceInput((8, 6), 3, mean, std, colour=colour)
        got, _ = spec(image, np.zeros((68, 2), np.float32))
        ordered = image if colour == "rgb" else image[..., ::-1]
        for c in range(3):
            expected = (torch.from_numpy(ordered[..., c].copy()).float() - mean[c]) / std[c]
            torch.testing.assert_close(got[c], expected)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None]
        torch.testing.assert_close(DifferentiableInput(spec)(pixels)[0], got)
    with pytest.raises(ValueError, match="input.mean has 3 values but the input has 1"):
        FaceInput((8, 6), 1, mean, 1.0)
    with pytest.raises(ValueError, match="must not be 0"):
        FaceInput((8, 6), 3, 0.0, [1.0, 0.0, 1.0])


def test_per_channel_mean_from_a_backbone_config(compose_evaluate):
    from faceemd.models.build import build_face_input

    cfg = compose_evaluate(["backbone=sface", "backbone.input.mean=[1,2,3]"])
    assert build_face_input(cfg.backbone).mean == (1.0, 2.0, 3.0)
