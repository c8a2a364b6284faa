"""`faceemd identify`: raw photos against a folder of people, as a user runs it (the `faceemd`
command in a subprocess): answers, bad inputs that leave the other queries answered, the
gallery's features reused by a second call, and the HTML page parsed with its images."""

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import ROOT, SHARED

RAW = SHARED / "data" / "lfw" / "raw-sample"
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason="../shared LFW raw sample is absent")


def _faceemd(*args, cwd):
    cmd = [sys.executable, "-m", "faceemd.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _run_dir(cwd: Path) -> Path:
    found = sorted((cwd / "outputs" / "identify" / "runs").iterdir())
    return found[-1]


@needs_raw
def test_identify_raw_lfw_photos(tmp_path):
    people = sorted(p.name for p in RAW.iterdir() if p.is_dir())
    gallery, queries = tmp_path / "people", tmp_path / "queries"
    queries.mkdir()
    for name in people:  # first 3 photos of each person known, the 4th asked about
        photos = sorted((RAW / name).iterdir())
        (gallery / name).mkdir(parents=True)
        for p in photos[:3]:
            shutil.copy(p, gallery / name / p.name)
        shutil.copy(photos[3], queries / photos[3].name)
    a = cv2.imread(str(sorted((RAW / people[0]).iterdir())[3]))
    b = cv2.imread(str(sorted((RAW / people[1]).iterdir())[3]))
    cv2.imwrite(str(tmp_path / "two.jpg"), np.hstack([a, b]))  # two faces: two queries
    cv2.imwrite(str(tmp_path / "noface.png"), np.full((200, 200, 3), 127, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    args = [queries, tmp_path / "two.jpg", tmp_path / "noface.png", tmp_path / "broken.jpg"]
    run = _faceemd("identify", *args, "--gallery", gallery, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((_run_dir(tmp_path) / "identify.json").read_text())
    faces = out["faces"]
    truth = {str(queries / sorted((RAW / n).iterdir())[3].name): n for n in people}
    answered = {f["photo"]: f for f in faces if f["photo"] in truth}
    assert len(answered) == len(people)
    correct = sum(answered[p]["stage2"][0]["identity"] == n for p, n in truth.items())
    assert correct >= len(people) - 1, [(p, answered[p]["stage2"][0]) for p in truth]
    # SFace's measured threshold (CFP-FF, FAR 1e-3) keeps most true matches known
    assert out["threshold"] == pytest.approx(0.467)
    known = sum(answered[p]["answer"] == n for p, n in truth.items())
    assert known >= len(people) - 3, [(p, answered[p]["stage2"][0]) for p in truth]
    two = [f for f in faces if f["photo"].endswith("two.jpg")]
    assert sorted(f["stage2"][0]["identity"] for f in two) == sorted(people[:2])
    problems = {Path(p["photo"]).name: p["reason"] for p in out["problems"]}
    assert problems["noface.png"] == "no face found"
    assert "cannot be decoded" in problems["broken.jpg"]
    assert "noface.png" in run.stderr + run.stdout
    for f in faces:
        assert len(f["stage2"]) == 5 and len({c["identity"] for c in f["stage2"]}) == 5
        top = f["stage2"][0]
        assert top["emd"] is not None and top["score"] == pytest.approx(
            0.7 * top["emd"] + 0.3 * top["cosine"], abs=2e-4
        )
    # the page parses and every image it references exists in its folder
    page = _run_dir(tmp_path) / "identify.html"
    parser = _Images()
    parser.feed(page.read_text())
    assert len(parser.sources) >= len(faces) * 12
    for src in parser.sources:
        assert not src.startswith(("http", "/")) and (page.parent / src).is_file(), src
    # a second call on the same gallery detects and extracts nothing for it
    again = _faceemd("identify", queries, "--gallery", gallery, "-v", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "extracting gallery faces" not in log
    assert "feature cache: hit" in log


def test_identify_synthetic_faces_flat_gallery(tmp_path):
    """The embedded synthetic faces (no ../shared): a flat Name_NNNN gallery, one query photo
    per person and a photo with two of them; a threshold above every score makes all unknown."""
    from faceemd.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=6, images_per_identity=3, seed=3)
    gallery, queries = tmp_path / "people", tmp_path / "queries"
    gallery.mkdir()
    queries.mkdir()
    for i in range(len(faces)):
        image, name, _ = faces[i]
        big = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR)
        if i % 3 < 2:
            cv2.imwrite(str(gallery / f"{name}_{i % 3:04d}.png"), big)
        else:
            cv2.imwrite(str(queries / f"{name}.png"), big)
    run = _faceemd(
        "identify", queries, "--gallery", gallery, "unknown_threshold=null", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((_run_dir(tmp_path) / "identify.json").read_text())
    assert out["gallery"]["identities"] == 6 and out["gallery"]["images"] == 12
    assert len(out["faces"]) == 6
    correct = sum(Path(f["photo"]).stem == f["answer"] for f in out["faces"])
    assert correct >= 5, [(f["photo"], f["answer"]) for f in out["faces"]]
    for name in (f["answer"] for f in out["faces"]):
        assert name in run.stdout  # the console table names the answer
    strict = _faceemd(
        "identify", queries, "--gallery", gallery, "unknown_threshold=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert strict.returncode == 0, strict.stderr[-3000:]
    out = json.loads((_run_dir(tmp_path) / "identify.json").read_text())
    assert {f["answer"] for f in out["faces"]} == {"unknown"}


def test_identify_empty_gallery_and_missing_query(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _faceemd("identify", tmp_path / "x.jpg", "--gallery", tmp_path / "empty", cwd=tmp_path)
    assert run.returncode != 0
    assert "holds no photo" in run.stderr


def test_help_lists_the_config_groups():
    run = _faceemd("identify", "--help", cwd=ROOT)
    assert run.returncode == 0
    assert "backbone:" in run.stdout and "rerank:" in run.stdout
    top = _faceemd("--help", cwd=ROOT)
    assert top.returncode == 0 and "identify" in top.stdout
