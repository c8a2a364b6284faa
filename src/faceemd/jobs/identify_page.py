"""The HTML page of ``faceemd identify``: each query face, its top identities before and after
re-ranking, and the flow picture of its best match.

``identify.html`` references only files of its own folder (``identify_files/``: the aligned
query faces, the gallery faces shown, the flow pictures), so the folder opens offline in any
browser and can be moved or archived as a whole. Nothing is loaded from the network.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from faceemd.storage.atomic import atomic_write_text
from faceemd.storage.manifest import write_image

__all__ = ["write_page"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td { padding: 4px; text-align: center; vertical-align: top; font-size: 12px; }
img { height: 112px; image-rendering: pixelated; }
.unknown { color: #b00; } .answer { color: #070; }
"""


def _cell(src: str, caption: str) -> str:
    return f'<td><img src="{html.escape(src)}" alt=""><br>{caption}</td>'


def write_page(out_dir: Path, result: dict, pictures: list[dict], gallery) -> Path:
    """Write ``identify.html`` and its images under ``out_dir``; returns the page's path.
    ``pictures[i]`` holds face ``i``'s aligned ``query`` image and its ``flow`` picture (or
    None); ``gallery`` is the aligned gallery set the results' ``gallery_image`` names."""
    out_dir = Path(out_dir)
    files = out_dir / "identify_files"
    shown: dict[str, str] = {}
    position = {rel: i for i, rel in enumerate(gallery.files)}

    def gallery_src(rel: str) -> str:
        if rel not in shown:
            name = f"gallery_{len(shown):04d}.png"
            write_image(files / name, gallery[position[rel]][0])
            shown[rel] = f"identify_files/{name}"
        return shown[rel]

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>faceemd identify</title>",
        f"<style>{_STYLE}</style></head><body><h1>faceemd identify</h1>",
        f"<p>gallery {html.escape(result['gallery']['root'])}: "
        f"{result['gallery']['identities']} people, {result['gallery']['images']} faces; "
        f"unknown below stage-2 score {result['threshold']}</p>",
    ]
    for problem in result["problems"]:
        parts.append(
            f"<p class='unknown'>{html.escape(problem['photo'])}: "
            f"{html.escape(problem['reason'])}</p>"
        )
    for i, (face, pics) in enumerate(zip(result["faces"], pictures, strict=True)):
        query_src = f"identify_files/query_{i:04d}.png"
        write_image(out_dir / query_src, np.ascontiguousarray(pics["query"]))
        css = "unknown" if face["answer"] == "unknown" else "answer"
        parts.append(
            f"<h2>{html.escape(face['photo'])}, face {face['face']}: "
            f"<span class='{css}'>{html.escape(face['answer'])}</span></h2><table>"
        )
        for stage, label in (("stage1", "stage 1 (cosine)"), ("stage2", "stage 2 (re-ranked)")):
            cells = [_cell(query_src, label)]
            for rank, c in enumerate(face[stage], 1):
                emd = "" if c["emd"] is None else f"<br>EMD {c['emd']:.3f}"
                caption = (
                    f"{rank}. {html.escape(c['identity'])}<br>cos {c['cosine']:.3f}{emd}"
                    f"<br>score {c['score']:.3f}"
                )
                cells.append(_cell(gallery_src(c["gallery_image"]), caption))
            parts.append("<tr>" + "".join(cells) + "</tr>")
        if pics["flow"] is not None:
            flow_src = f"identify_files/flow_{i:04d}.png"
            write_image(out_dir / flow_src, np.ascontiguousarray(pics["flow"]))
            best = face["stage2"][0]
            parts.append(
                "<tr>"
                + _cell(flow_src, "flow: the query rebuilt from the best match's patches")
                + _cell(gallery_src(best["gallery_image"]), html.escape(best["identity"]))
                + "</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    page = out_dir / "identify.html"
    atomic_write_text(page, "\n".join(parts))
    return page
