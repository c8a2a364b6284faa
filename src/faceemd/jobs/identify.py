"""``faceemd identify QUERY... --gallery DIR``: who is in these photos, given a folder of people.

The daily job of a face-recognition user (serengil/deepface's ``DeepFace.find(img_path,
db_path)``), done with the two-stage method:

- the **gallery** is a folder of people, one subfolder per person (``Alice/1.jpg``) or flat
  ``Name_NNNN.jpg`` files; each photo's most central face is detected (YuNet) and aligned to the
  backbone's template once (:class:`faceemd.data.aligned.AlignedFaces`, under
  ``paths.aligned_dir``), and its features go to the feature cache, so a second call on the
  same folder detects and extracts nothing;
- every face found in a **query** photo is a query (:class:`DetectedFaces`); a photo with no
  face or that cannot be read is reported and the other queries are still answered;
- stage 1 (cosine) and stage 2 (EMD re-ranking of the top k) rank the gallery photos; the
  first ``top`` distinct identities of each stage are reported with their cosine, EMD and
  blended scores. A face whose best stage-2 score is below ``unknown_threshold`` is
  ``unknown`` (the threshold of each backbone config comes from a measured verification run,
  see its ``unknown_threshold`` comment).

Writes ``identify.json`` and ``identify.html`` (:mod:`faceemd.jobs.identify_page`) into the run
folder and prints a table per query face.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from faceemd.console import quiet_console
from faceemd.data.align import align_face, resolve_template
from faceemd.data.aligned import AlignedFaces
from faceemd.data.datamodule import IdentificationDataModule
from faceemd.data.decoding import IMAGE_SUFFIXES, read_image
from faceemd.data.detection import YuNetDetector
from faceemd.data.errors import BadImageError
from faceemd.data.layouts import FlatFolderFaces, ImageFolderFaces
from faceemd.emd import two_stage_rank
from faceemd.emd.projection import reduced_banks
from faceemd.jobs.extraction import load_or_extract
from faceemd.jobs.identify_page import write_page
from faceemd.jobs.instantiators import build_cache, rerank_config
from faceemd.models.build import build_backbone, build_face_input
from faceemd.storage.atomic import write_json
from faceemd.storage.patch_space import PatchSpaceStore
from faceemd.visualize import flow_picture, match_flow

__all__ = ["QUERY_LABEL", "DetectedFaces", "gallery_faces", "identify", "query_photos"]

log = logging.getLogger(__name__)

QUERY_LABEL = "<query>"  # the identity name of every query face (unknown by definition)
# Flat gallery files: the person's name, optionally followed by _<number> (``Alice_0002.jpg``).
FLAT_NAME = r"(?P<name>.+?)(?:_\d+)?"


def query_photos(paths: list[str]) -> list[Path]:
    """The photos named by ``paths``: files as given, folders as their image files (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


class DetectedFaces:
    """Every face YuNet finds in ``photos``, aligned to ``template`` in memory: the queries.

    Items are ``(aligned image, QUERY_LABEL, NaN landmarks)``; ``origin[i]`` says where face
    ``i`` came from (``photo``, ``face`` number left to right, ``box``, ``score``) and
    ``problems`` lists ``(photo, reason)`` for photos that gave no face (unreadable, no face)."""

    def __init__(self, photos: list[Path], template: str, detector: dict | None = None) -> None:
        det = YuNetDetector(**(detector or {}))
        self.images: list[np.ndarray] = []
        self.origin: list[dict] = []
        self.problems: list[tuple[str, str]] = []
        for photo in photos:
            try:
                image = read_image(photo)
            except BadImageError as err:
                self.problems.append((str(photo), str(err)))
                continue
            faces = det.detect(image)
            if not len(faces):
                self.problems.append((str(photo), "no face found"))
                continue
            for n, face in enumerate(faces[np.argsort(faces[:, 0])]):
                aligned, _ = align_face(
                    image, face[4:14].reshape(5, 2).astype(np.float64), template
                )
                self.images.append(aligned)
                box = [round(float(x), 1) for x in face[:4]]
                self.origin.append({"photo": str(photo), "face": n, "box": box, "score": round(float(face[14]), 4)})  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def label_names(self) -> list[str]:
        return [QUERY_LABEL] * len(self)

    def fingerprint(self) -> dict:
        """The aligned pixels themselves (queries are few; the feature cache keys them so)."""
        h = hashlib.sha256()
        for image in self.images:
            h.update(str(image.shape).encode() + image.tobytes())
        return {"type": "DetectedFaces", "sha256": h.hexdigest()}

    def __getitem__(self, index: int):
        return self.images[index], QUERY_LABEL, np.full((68, 2), np.nan, np.float32)


def gallery_faces(root, template: str, out_root, detector: dict | None = None) -> AlignedFaces:
    """The gallery folder's photos, detected and aligned once (photos without a face skipped
    and named). One subfolder per person, or flat files named after the person."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder not found: {root}")
    people = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    try:
        if people:
            source = ImageFolderFaces(root, min_images_per_identity=1, on_bad_image="skip")
        else:
            source = FlatFolderFaces(root, label_pattern=FLAT_NAME, on_bad_image="skip")
    except ValueError as err:
        raise ValueError(
            f"gallery folder {root} holds no photo ({err}); put one subfolder per person "
            "(Alice/1.jpg) or files named after the person (Alice_0001.jpg)"
        ) from err
    return AlignedFaces(source, template, out_root, "detector", detector, on_bad_image="skip")


def identify(cfg: DictConfig) -> dict:
    """Run one identify job (``conf/identify.yaml``); returns what ``identify.json`` holds."""
    quiet_console()
    L.seed_everything(cfg.seed, verbose=False)
    template = resolve_template(cfg.backbone.input.template)
    if template is None:
        raise ValueError(
            f"backbone {cfg.backbone.name} declares no alignment template "
            "(backbone.input.template): identify aligns raw photos to it"
        )
    photos = query_photos(list(cfg.queries))
    if not photos:
        raise ValueError("no query photo given: faceemd identify PHOTO... --gallery DIR")
    gallery = gallery_faces(cfg.gallery, template, cfg.paths.aligned_dir, cfg.detector)
    queries = DetectedFaces(photos, template, cfg.detector)
    for photo, reason in queries.problems:
        log.warning("%s: %s; the other queries are still answered", photo, reason)
    for photo, reason in gallery.skip_list:
        log.warning("gallery photo %s skipped: %s", photo, reason)
    threshold = cfg.get("unknown_threshold")
    if threshold is None:
        log.warning(
            "backbone %s has no measured unknown_threshold: every face gets its best match "
            "(set unknown_threshold=<stage-2 score>)", cfg.backbone.name,
        )  # fmt: skip
    result = {
        "gallery": {"root": str(cfg.gallery), **gallery.summary(), "skipped": len(gallery.skip_list)},
        "threshold": threshold,
        "problems": [{"photo": p, "reason": r} for p, r in queries.problems],
        "faces": [],
    }  # fmt: skip
    pictures: list[dict] = []
    if len(queries):
        result["faces"], pictures = _rank(cfg, queries, gallery, template, threshold)
    out_dir = Path(cfg.paths.output_dir)
    write_json(out_dir / "identify.json", result)
    page = write_page(out_dir, result, pictures, gallery)
    _print(result)
    Console().print(f"results: {out_dir / 'identify.json'}, {page}")
    return result


def _rank(cfg: DictConfig, queries: DetectedFaces, gallery: AlignedFaces, template, threshold):
    """Per query face its answer and top identities of both stages, and its pictures (the
    aligned query, the flow picture of its best stage-2 match)."""
    datamodule = IdentificationDataModule(
        queries, gallery, build_face_input(cfg.backbone), int(cfg.batch_size),
        int(cfg.num_workers), frame=template,
    )  # fmt: skip
    datamodule.setup("test")
    backbone = build_backbone(cfg.backbone)
    cache = build_cache(cfg.get("cache"))
    feats, _, _ = load_or_extract(cfg, backbone, datamodule, [], cache)
    g_feats = feats["gallery"]
    rerank = rerank_config(cfg.rerank)
    rerank = dataclasses.replace(rerank, top_k=min(rerank.top_k, len(g_feats)))
    store = None  # the gallery's reduced grids are kept for the next day's queries
    if cache is not None and g_feats.key and feats["query"].key:
        store = PatchSpaceStore(cache, feats["query"].key, g_feats.key, rerank.grid)
    qb, gb = reduced_banks(
        feats["query"].to_bank(rerank.grid), g_feats.to_bank(rerank.grid), rerank.screen_dim,
        False, store,
    )  # fmt: skip
    ranking = two_stage_rank(qb, gb, rerank, depth=min(len(g_feats), max(rerank.top_k, 200)))
    inverse = {i: name for name, i in datamodule.vocab.items()}
    names = [inverse[int(x)] for x in gb.labels]
    g_pos = g_feats.index.tolist()
    grid = rerank.grid or g_feats.grid_shape
    faces, pictures = [], []
    for q, pos in enumerate(feats["query"].index.tolist()):
        scores = _scores(q, ranking, rerank.top_k)
        s1 = _candidates(ranking.stage1_index[q].tolist(), scores, names, int(cfg.top))
        s2 = _candidates(ranking.stage2_index[q].tolist(), scores, names, int(cfg.top))
        best_row = s2[0]["row"]
        for entry in s1 + s2:
            entry["gallery_image"] = gallery.files[g_pos[entry.pop("row")]]
        known = threshold is None or s2[0]["score"] >= float(threshold)
        faces.append({
            **queries.origin[pos], "answer": s2[0]["identity"] if known else "unknown",
            "stage1": s1, "stage2": s2,
        })  # fmt: skip
        image = queries[pos][0]
        flow = None
        if rerank.top_k and rerank.alpha > 0:
            plan, u, _ = match_flow(q, best_row, qb, gb, rerank)
            flow = flow_picture(image, gallery[g_pos[best_row]][0], plan, u, grid)
        pictures.append({"query": image, "flow": flow})
    return faces, pictures


def _scores(q: int, ranking, k: int) -> tuple[dict, dict, dict]:
    """Query ``q``'s ``{gallery row: score}`` tables: cosine, EMD (the stage-1 top ``k`` only)
    and stage-2 score."""
    s1_row = ranking.stage1_index[q].tolist()
    cosine = dict(zip(s1_row, ranking.stage1_score[q].tolist(), strict=True))
    emd = {}
    if ranking.emd_similarity is not None:
        emd = dict(zip(s1_row[:k], ranking.emd_similarity[q].tolist(), strict=True))
    s2_row = ranking.stage2_index[q].tolist()
    return cosine, emd, dict(zip(s2_row, ranking.stage2_score[q].tolist(), strict=True))


def _candidates(order: list[int], scores: tuple[dict, dict, dict], names: list[str], top: int):
    """The first ``top`` distinct identities of a stage's ranking ``order`` (gallery rows),
    each with its best-ranked row and that row's cosine, EMD (None outside the stage-1 top k)
    and stage-2 score."""
    cosine, emd, blended = scores
    out, seen = [], set()
    for g in order:
        if names[g] in seen:
            continue
        seen.add(names[g])
        out.append({
            "identity": names[g], "row": g, "cosine": round(cosine[g], 4),
            "emd": round(emd[g], 4) if g in emd else None, "score": round(blended[g], 4),
        })  # fmt: skip
        if len(out) == top:
            break
    return out


def _print(result: dict) -> None:
    console = Console()
    for face in result["faces"]:
        table = Table(title=f"{face['photo']} face {face['face']}: {face['answer']}")
        for col in ("rank", "identity", "cosine", "EMD", "score"):
            table.add_column(col, justify="left" if col == "identity" else "right")
        for rank, c in enumerate(face["stage2"], 1):
            emd = "" if c["emd"] is None else f"{c['emd']:.4f}"
            table.add_row(str(rank), c["identity"], f"{c['cosine']:.4f}", emd, f"{c['score']:.4f}")
        console.print(table)
