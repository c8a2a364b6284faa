"""Verification: metrics against scikit-learn and brute force, pair readers in every layout,
pair scores against an independent EMD, and evaluate.py end to end on generated pairs."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score, roc_curve

from faceemd.data.pairs import PairFaces, pairs_of
from faceemd.emd import FeatureBank, RerankConfig
from faceemd.metrics import best_threshold, verification_metrics
from faceemd.verification import score_pairs

from .conftest import SHARED, write_noise_image

CFP = SHARED / "data" / "cfp"


def _brute_accuracy(scores, same, fold):
    """Each fold's threshold by trying every midpoint (and the two outer values) on the other
    folds with plain loops; the lowest of the best; mean and population std of the folds."""
    accs = []
    for f in sorted(set(fold.tolist())):
        train = [i for i in range(len(scores)) if fold[i] != f]
        values = sorted({float(scores[i]) for i in train})
        cands = [values[0] - 1.0]
        cands += [(a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)]
        cands += [values[-1] + 1.0]
        best, best_t = -1, None
        for t in cands:
            correct = sum((scores[i] >= t) == same[i] for i in train)
            if correct > best:
                best, best_t = correct, t
        test = [i for i in range(len(scores)) if fold[i] == f]
        accs.append(sum((scores[i] >= best_t) == same[i] for i in test) / len(test))
    return float(np.mean(accs)), float(np.std(accs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verification_metrics_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 400
    same = rng.random(n) < 0.5
    # rounded scores: many ties, also across the two classes
    scores = np.round(rng.normal(size=n) + 1.5 * same, 1)
    fold = np.repeat(np.arange(4), n // 4)
    got = verification_metrics(scores, same, fold, far=0.05)
    acc, std = _brute_accuracy(scores, same, fold)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert got["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-6)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    assert got["tar_at_far_0.05"] == pytest.approx(tpr[fpr <= 0.05].max(), abs=1e-6)
    # EER: where fpr - fnr changes sign along sklearn's ROC, linearly interpolated
    d = fpr - (1 - tpr)
    i = int(np.nonzero(d >= 0)[0][0])
    w = d[i - 1] / (d[i - 1] - d[i])
    assert got["eer"] == pytest.approx(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]), abs=1e-6)


def test_verification_metrics_hand_cases():
    same = np.array([True, True, False, False])
    fold = np.array([0, 1, 0, 1])
    perfect = verification_metrics(np.array([0.9, 0.8, 0.1, 0.2]), same, fold)
    assert perfect == {
        "accuracy": 1.0,
        "accuracy_std": 0.0,
        "auc": 1.0,
        "eer": 0.0,
        "tar_at_far_0.001": 1.0,
    }
    # reversed scores: every threshold learnt on one fold is wrong on the other
    reversed_ = verification_metrics(np.array([0.1, 0.2, 0.9, 0.8]), same, fold)
    assert reversed_["auc"] == 0.0 and reversed_["eer"] == 1.0
    assert reversed_["tar_at_far_0.001"] == 0.0
    # threshold rule: midpoint between the scores it separates
    assert best_threshold(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.5
    with pytest.raises(ValueError, match="both same-person and different-person"):
        verification_metrics(np.ones(4), np.ones(4, bool), fold)
    with pytest.raises(ValueError, match="not finite"):
        verification_metrics(np.array([0.1, np.nan, 0.3, 0.4]), same, fold)


def _lfw_tree(root, names=("Ann_A", "Bob_B", "Cid_C"), per=3):
    for k, name in enumerate(names):
        for i in range(1, per + 1):
            write_noise_image(root / name / f"{name}_{i:04d}.jpg", seed=10 * k + i)


def test_lfw_pairs_file(tmp_path):
    _lfw_tree(tmp_path)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nAnn_A\t1\t2\nBob_B\t1\tCid_C\t3\nCid_C\t2\t3\nAnn_A\t3\tBob_B\t2\n")
    faces = PairFaces(tmp_path, "lfw", pairs)
    p = faces.pairs
    assert [(faces.files[a], faces.files[b]) for a, b in zip(p.first, p.second, strict=True)] == [
        ("Ann_A/Ann_A_0001.jpg", "Ann_A/Ann_A_0002.jpg"),
        ("Bob_B/Bob_B_0001.jpg", "Cid_C/Cid_C_0003.jpg"),
        ("Cid_C/Cid_C_0002.jpg", "Cid_C/Cid_C_0003.jpg"),
        ("Ann_A/Ann_A_0003.jpg", "Bob_B/Bob_B_0002.jpg"),
    ]
    assert p.same.tolist() == [True, False, True, False]
    assert p.fold.tolist() == [0, 0, 1, 1]
    assert len(faces) == 7 and faces.labels[0] == "Ann_A"  # each image once
    assert faces[0][1] == "Ann_A"


@pytest.mark.parametrize(
    "text, message",
    [
        ("2\t1\nAnn_A\t1\t2\n", "header announces 2 folds x 2 pairs"),
        ("1\t1\nAnn_A\t1\nBob_B\t1\tCid_C\t3\n", r"pairs.txt:2: expected 'name i j'"),
        ("1\t1\nAnn_A\t1\tx\nBob_B\t1\tCid_C\t3\n", r"pairs.txt:2: 'x' is not an image number"),
        ("1\t1\nAnn_A\t1\t9\nBob_B\t1\tCid_C\t3\n", r"pairs.txt:2 names Ann_A/Ann_A_0009.jpg"),
    ],
)
def test_lfw_pairs_file_errors_name_file_and_line(tmp_path, text, message):
    _lfw_tree(tmp_path)
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        PairFaces(tmp_path, "lfw", tmp_path / "pairs.txt")


def test_triplet_and_calfw_pair_files(tmp_path):
    names = ["Ann_A_0001", "Ann_A_0002", "Bob_B_0001", "Bob_B_0002"]
    for k, n in enumerate(names):
        write_noise_image(tmp_path / f"{n}.jpg", seed=k)
    (tmp_path / "mlfw.txt").write_text(
        "Ann_A_0001.jpg Ann_A_0002.jpg 1\nAnn_A_0001 Bob_B_0001 0\n"
        "Bob_B_0001.jpg Bob_B_0002.jpg 1\nAnn_A_0002.jpg Bob_B_0002.jpg 0\n"
    )
    faces = PairFaces(tmp_path, "triplets", tmp_path / "mlfw.txt", folds=2)
    assert faces.pairs.same.tolist() == [True, False, True, False]
    assert faces.pairs.fold.tolist() == [0, 0, 1, 1]
    assert faces.files[faces.pairs.second[1]] == "Bob_B_0001.jpg"  # matched by stem
    assert sorted(set(faces.labels)) == ["Ann_A", "Bob_B"]
    with pytest.raises(ValueError, match="4 pairs do not split into 3 equal folds"):
        PairFaces(tmp_path, "triplets", tmp_path / "mlfw.txt", folds=3)
    (tmp_path / "calfw.txt").write_text(
        "Ann_A_0001.jpg 7\nAnn_A_0002.jpg 7\nAnn_A_0001.jpg 0\nBob_B_0001.jpg 0\n"
    )
    calfw = PairFaces(tmp_path, "calfw", tmp_path / "calfw.txt", folds=2)
    assert calfw.pairs.same.tolist() == [True, False]
    (tmp_path / "bad.txt").write_text("Ann_A_0001.jpg 7\nAnn_A_0002.jpg\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'img label'"):
        PairFaces(tmp_path, "calfw", tmp_path / "bad.txt", folds=1)


def _four_faces(root):
    names = ["Ann_A_0001", "Ann_A_0002", "Bob_B_0001", "Bob_B_0002"]
    for k, n in enumerate(names):
        write_noise_image(root / f"{n}.jpg", seed=k)


def test_a_pair_file_that_is_not_utf8_is_named_with_line_and_byte_offset(tmp_path):
    _four_faces(tmp_path)
    body = "Ann_A_0001.jpg Ann_A_0002.jpg 1\n" * 3000 + "Ann_A_0001.jpg Bob_B_0001.jpg 0\n"
    data = body.encode() + b"Bob_B_0001.jpg Bob_\xff_0002.jpg 1\n"
    (tmp_path / "pairs.txt").write_bytes(data)
    with pytest.raises(ValueError) as err:
        PairFaces(tmp_path, "triplets", tmp_path / "pairs.txt", folds=2)
    message = str(err.value)
    offset = data.index(b"\xff")
    assert f"pairs.txt:3002: byte {offset} (0xff) is not UTF-8" in message
    assert len(message) < 400  # the file's content is not quoted


def test_pair_file_labels_duplicates_self_pairs_and_paths(tmp_path, caplog):
    """-1 means 'not the same person'; a self-pair is dropped and counted; a duplicate is
    counted; an image named by its absolute path and by a relative one is one image."""
    import logging

    _four_faces(tmp_path)
    (tmp_path / "pairs.txt").write_text(
        f"{tmp_path / 'Ann_A_0001.jpg'} Ann_A_0002.jpg 1\nAnn_A_0001.jpg Bob_B_0001.jpg -1\n"
        "Bob_B_0001.jpg Bob_B_0002.jpg 1\n./Ann_A_0002.jpg Bob_B_0002.jpg 0\n"
        "Bob_B_0001.jpg Bob_B_0002.jpg 1\nAnn_A_0001.jpg Ann_A_0001.jpg 1\n"
    )
    with caplog.at_level(logging.WARNING, logger="faceemd.data.pairs"):
        faces = PairFaces(tmp_path, "triplets", tmp_path / "pairs.txt", folds=2)
    assert faces.pairs.same.tolist() == [True, False, True, False, True]
    assert sorted(faces.files) == [f"{n}.jpg" for n in
                                   ("Ann_A_0001", "Ann_A_0002", "Bob_B_0001", "Bob_B_0002")]  # fmt: skip
    text = caplog.text
    assert "1 pair(s) of an image with itself left out" in text
    assert "1 pair(s) listed more than once" in text
    (tmp_path / "bad.txt").write_text("Ann_A_0001.jpg Ann_A_0002.jpg 2\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: label 2"):
        PairFaces(tmp_path, "triplets", tmp_path / "bad.txt", folds=1)


@pytest.mark.parametrize(
    "text, folds, message",
    [
        ("Ann_A_0001.jpg Ann_A_0002.jpg 1\nAnn_A_0001.jpg Bob_B_0001.jpg 0\n", 1,
         "fall into 1 fold"),
        ("Ann_A_0001.jpg Ann_A_0002.jpg 1\nBob_B_0001.jpg Bob_B_0002.jpg 1\n", 2,
         "every pair is a same-person pair"),
    ],
)  # fmt: skip
def test_unusable_protocols_are_refused_before_any_image_is_read(tmp_path, monkeypatch, text,
                                                                 folds, message):  # fmt: skip
    from faceemd.data import faceset

    _four_faces(tmp_path)
    (tmp_path / "pairs.txt").write_text(text)

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(faceset, "read_image", no_reading)
    with pytest.raises(ValueError, match=message):
        PairFaces(tmp_path, "triplets", tmp_path / "pairs.txt", folds=folds)


def _cfp_tree(root):
    """A 2-person CFP tree: 2 frontal + 1 profile each, FF and FP folds (1-based ids)."""
    flist, plist = [], []
    for ident in ("001", "002"):
        for n in ("01", "02"):
            write_noise_image(root / "Data" / "Images" / ident / "frontal" / f"{n}.jpg")
            flist.append(f"../Data/Images/{ident}/frontal/{n}.jpg")
        write_noise_image(root / "Data" / "Images" / ident / "profile" / "01.jpg")
        plist.append(f"../Data/Images/{ident}/profile/01.jpg")
    proto = root / "Protocol"
    proto.mkdir()
    (proto / "Pair_list_F.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(flist, 1)))
    (proto / "Pair_list_P.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(plist, 1)))
    for prot, folds in (
        ("FP", [("1,1", "1,2"), ("4,2", "3,1")]),
        ("FF", [("1,2", "1,3"), ("3,4", "2,4")]),
    ):
        for k, (same, diff) in enumerate(folds, 1):
            folder = proto / "Split" / prot / f"{k:02d}"
            folder.mkdir(parents=True)
            (folder / "same.txt").write_text(same + "\n")
            (folder / "diff.txt").write_text(diff + "\n")


def test_cfp_pairs_map_fold_numbers_to_pair_lists(tmp_path):
    _cfp_tree(tmp_path)
    fp = PairFaces(tmp_path, "cfp_fp")
    named = [
        (fp.files[a], fp.files[b]) for a, b in zip(fp.pairs.first, fp.pairs.second, strict=True)
    ]
    assert named == [
        ("Data/Images/001/frontal/01.jpg", "Data/Images/001/profile/01.jpg"),
        ("Data/Images/001/frontal/01.jpg", "Data/Images/002/profile/01.jpg"),
        ("Data/Images/002/frontal/02.jpg", "Data/Images/002/profile/01.jpg"),
        ("Data/Images/002/frontal/01.jpg", "Data/Images/001/profile/01.jpg"),
    ]
    assert fp.pairs.same.tolist() == [True, False, True, False]
    assert fp.pairs.fold.tolist() == [0, 0, 1, 1]
    ff = PairFaces(tmp_path, "cfp_ff")
    assert ff.files[ff.pairs.second[0]] == "Data/Images/001/frontal/02.jpg"
    (tmp_path / "Protocol" / "Split" / "FF" / "02" / "diff.txt").write_text("2,9\n")
    with pytest.raises(ValueError, match=r"FF/02/diff.txt:1: 2,9 outside 1..4 / 1..4"):
        PairFaces(tmp_path, "cfp_ff")


@pytest.mark.skipif(not CFP.is_dir(), reason="../shared/data/cfp is not present")
@pytest.mark.parametrize("layout", ["cfp_fp", "cfp_ff"])
def test_real_cfp_folds(layout):
    faces = PairFaces(CFP, layout)
    p = faces.pairs
    assert len(p) == 7000 and p.same.sum() == 3500
    assert np.bincount(p.fold).tolist() == [700] * 10
    # the images named: distinct (pose, number) references over all split files
    split = CFP / "Protocol" / "Split" / layout[-2:].upper()
    refs = set()
    for f in split.glob("*/*.txt"):
        for line in f.read_text().split():
            i, j = line.split(",")
            refs |= {("F", int(i)), (layout[-1].upper(), int(j))}
    assert len(faces) == len(refs) == len(set(faces.files))
    ids_a = np.array([faces.labels[i] for i in p.first])
    ids_b = np.array([faces.labels[i] for i in p.second])
    # fold numbers index the pair lists: same pairs share the identity folder, others never
    assert (ids_a[p.same] == ids_b[p.same]).all() and (ids_a[~p.same] != ids_b[~p.same]).all()
    if layout == "cfp_fp":  # Split/FP/01/same.txt line 1 is "5,1"
        assert faces.files[p.first[0]] == "Data/Images/001/frontal/05.jpg"
        assert faces.files[p.second[0]] == "Data/Images/001/profile/01.jpg"
        assert all("/profile/" in faces.files[j] for j in p.second)


def test_pairs_of_a_derived_set_drops_pairs_that_lost_an_image(tmp_path):
    _lfw_tree(tmp_path)
    (tmp_path / "pairs.txt").write_text(
        "2\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t2\nCid_C\t2\t3\nBob_B\t1\tCid_C\t3\n"
    )
    source = PairFaces(tmp_path, "lfw", tmp_path / "pairs.txt")

    class Derived:  # what MaterialisedFaces exposes: its source and the kept source positions
        pass

    derived = Derived()
    derived.source = source
    lost = source.files.index("Cid_C/Cid_C_0003.jpg")
    derived.source_index = [i for i in range(len(source)) if i != lost]
    p = pairs_of(derived)
    assert p.dropped == 2 and p.same.tolist() == [True, False]
    kept = [source.files[i] for i in derived.source_index]
    assert [kept[i] for i in p.first] == ["Ann_A/Ann_A_0001.jpg", "Ann_A/Ann_A_0001.jpg"]
    assert [kept[i] for i in p.second] == ["Ann_A/Ann_A_0002.jpg", "Bob_B/Bob_B_0002.jpg"]


def test_pair_emd_equals_an_assignment_problem_and_eq9_blend():
    """Uniform weights on equal-size grids: the EMD is a min-cost perfect matching / R
    (scipy's assignment solver, independent of POT and of Sinkhorn)."""
    g = torch.Generator().manual_seed(0)
    n, r, c = 6, 9, 16
    bank = FeatureBank(
        torch.randn(n, 8, generator=g), torch.randn(n, r, c, generator=g), torch.arange(n)
    )
    first, second = torch.tensor([0, 1, 2, 5]), torch.tensor([3, 4, 5, 0])
    cfg = RerankConfig(weighting="uniform", solver="exact", alpha=0.7, top_k=100)
    got = score_pairs(bank, first, second, cfg)
    for i, (a, b) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        pa = torch.nn.functional.normalize(bank.patches[a].double(), dim=1)
        pb = torch.nn.functional.normalize(bank.patches[b].double(), dim=1)
        cost = (1 - pa @ pb.T).numpy()
        rows, cols = linear_sum_assignment(cost)
        emd_sim = 1 - cost[rows, cols].sum() / r
        ea = torch.nn.functional.normalize(bank.embeddings[a].double(), dim=0)
        eb = torch.nn.functional.normalize(bank.embeddings[b].double(), dim=0)
        cos = float(ea @ eb)
        assert float(got.emd[i]) == pytest.approx(emd_sim, abs=1e-5)
        assert float(got.cosine[i]) == pytest.approx(cos, abs=1e-5)
        assert float(got.stage2[i]) == pytest.approx(0.7 * emd_sim + 0.3 * cos, abs=1e-5)
    off = score_pairs(bank, first, second, RerankConfig(top_k=0))
    assert off.emd is None and torch.equal(off.stage2, off.cosine)


def _synthetic_pairs_on_disk(root, n_ids=6, per=3):
    """Synthetic faces in the SFace frame written as an LFW tree, and an LFW pairs.txt of 2
    folds x 3 same + 3 different pairs."""
    import cv2

    from faceemd.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=n_ids, images_per_identity=per, template="arcface_112")
    names = []
    for i in range(len(faces)):
        image, name, _ = faces[i]
        k = names.count(name) + 1
        names.append(name)
        path = root / name / f"{name}_{k:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        assert cv2.imwrite(str(path), bgr)
    ids = sorted(set(names))
    lines = ["2\t3"]
    for fold in range(2):
        for j in range(3):
            lines.append(f"{ids[(3 * fold + j) % n_ids]}\t1\t{2 + (fold + j) % 2}")
        for j in range(3):
            a, b = ids[(3 * fold + j) % n_ids], ids[(3 * fold + j + 1) % n_ids]
            lines.append(f"{a}\t{1 + j % per}\t{b}\t{1 + (j + 1) % per}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")


def test_evaluate_verification_end_to_end(tmp_path):
    """evaluate.py data=pairs on generated faces: metrics.json, pair_scores.csv whose stage-2
    column is Eq. 9 of its cosine and EMD columns, and metrics recomputed from the CSV."""
    import csv
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    faces = tmp_path / "faces"
    _synthetic_pairs_on_disk(faces)
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    args = [
        "data=pairs",
        f"data.faces.root={faces}",
        f"data.faces.pairs_file={faces / 'pairs.txt'}",
        "data.frame=arcface_112",
        "data.num_workers=0",
        "rerank.alpha=0.5,0.7",
        f"paths.log_dir={tmp_path}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        "trainer.enable_progress_bar=false",
    ]
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "-m", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "accuracy" in out.stdout and "TAR@FAR=0.001" in out.stdout
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 2
    named = set()
    for line in (faces / "pairs.txt").read_text().splitlines()[1:]:
        t = line.split()
        named |= {(t[0], t[1]), (t[0], t[2])} if len(t) == 3 else {(t[0], t[1]), (t[2], t[3])}
    for job, alpha in zip(jobs, (0.5, 0.7), strict=True):
        payload = json.loads(job.read_text())
        m = payload["metrics"]
        assert payload["config"]["optimized_metric"] == "stage2/accuracy"
        assert m["eval/num_pairs"] == 12 and m["eval/num_same_pairs"] == 6
        assert m["eval/dropped_pairs"] == 0 and m["eval/num_images"] == len(named)
        with open(job.parent / "pair_scores.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 12
        cos = np.array([float(r["cosine"]) for r in rows])
        emd = np.array([float(r["emd"]) for r in rows])
        s2 = np.array([float(r["stage2"]) for r in rows])
        np.testing.assert_allclose(s2, alpha * emd + (1 - alpha) * cos, atol=2e-6)
        same = np.array([r["same"] == "1" for r in rows])
        fold = np.array([int(r["fold"]) for r in rows])
        assert same.tolist() == ([True] * 3 + [False] * 3) * 2
        for stage, s in (("stage1", cos), ("stage2", s2)):
            assert m[f"{stage}/auc"] == pytest.approx(roc_auc_score(same, s), abs=1e-4)
            acc, _ = _brute_accuracy(s, same, fold)
            assert m[f"{stage}/accuracy"] == pytest.approx(acc, abs=1e-4)
    # the second job of the alpha sweep reads the EMD of the first from the score cache
    assert json.loads(jobs[1].read_text())["metrics"]["eval/cached_stage2"] == 1
    # the sweep report: verification columns with the jobs' figures, and the alpha curve
    from faceemd.jobs.report import write_report

    out = write_report(tmp_path / "sweep")
    table = out["markdown"].read_text().splitlines()
    assert "S1 Acc" in table[0] and "S2 EER" in table[0] and "P@1" not in table[0]
    first = json.loads(jobs[0].read_text())["metrics"]
    assert f"{100 * first['stage2/accuracy']:.2f}" in table[2]
    assert out["alpha_curve"].is_file()
