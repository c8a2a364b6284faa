"""Two-stage evaluation against large generated galleries: time and peak memory by size.

Issues 8 and 18: a gallery of up to 1,000,000 x 4x4x512 generated items (no images) must run
two-stage evaluation on a 2-core, 24 GB machine with peak RSS under 4 GB, the gallery patch
grids in float16 and memory-mapped from disk (as the feature cache serves them with
cache.mmap=true; 16 GB of grids at 1M, plus 2 GB of per-item patch means). Each size runs in a
child process so that its peak RSS is its own; the generated files go to ``--dir`` (default:
a temporary folder under the working directory) and are removed after each size.

    python benchmarks/large_gallery.py                     # 10K, 100K, 1M
    python benchmarks/large_gallery.py --sizes 10000 --queries 200
    python benchmarks/large_gallery.py --patch-dim full 64 --refine-top 20   # reduced space

``--patch-dim d``: the gallery's grids are also stored reduced (``rerank.patch_dim``: a basis
fitted on 100,000 of its patches, the grids projected a chunk at a time and written as float16
``(G, R, d)`` with their norms and means, as the feature cache stores them; timed as "reduce
s"), and stage 2 ranks in that space, the queries projected in the job; with ``--refine-top
m`` the full grids stay mapped for the m candidates per query solved at full dimension.

The gallery comes with per-item patch norms and means and is marked verified, as a feature
cache entry provides them: stage 2 then reads only the candidates' rows of the map.

Memory of one run (floats of 4 bytes unless said):
  gallery embeddings G*D, patch norms G*R and patch means G*C (stage-2 precomputations),
  query features Q*(D + R*C), stage 1: query_batch_1 * (chunk_size + depth),
  stage 2: query_batch * k * R * (R + C) * ~4 (cost, kernel, flow, gathered candidates);
  the G*R*C float16 patch grids stay on disk and only the k candidates of a query batch are read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from faceemd.emd import FeatureBank, RerankConfig, stage1_topk, two_stage_rank
from faceemd.emd.bank import patch_summaries
from faceemd.emd.projection import fit_patch_basis, project_bank, project_patches


def generate(folder: Path, size: int, dim: int, r: int, c: int, chunk: int = 20000) -> None:
    """Identity-clustered features written chunk by chunk (never all in memory)."""
    rng = np.random.default_rng(0)
    ids = 1000
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    patch_centres = np.abs(rng.standard_normal((ids, r, c))).astype(np.float16)
    emb = np.lib.format.open_memmap(folder / "emb.npy", "w+", np.float32, (size, dim))
    patches = np.lib.format.open_memmap(folder / "patches.npy", "w+", np.float16, (size, r, c))
    norms = np.lib.format.open_memmap(folder / "norms.npy", "w+", np.float32, (size, r))
    means = np.lib.format.open_memmap(folder / "means.npy", "w+", np.float32, (size, c))
    labels = np.arange(size) % ids
    for a in range(0, size, chunk):
        b = min(a + chunk, size)
        lab = labels[a:b]
        emb[a:b] = centres[lab] + rng.standard_normal((b - a, dim), dtype=np.float32)
        noise = 0.3 * rng.standard_normal((b - a, r, c), dtype=np.float32)
        block = (patch_centres[lab].astype(np.float32) + noise).astype(np.float16)
        patches[a:b] = block
        # per-item summaries, as the feature cache stores them when it writes an entry
        n, m = patch_summaries(torch.from_numpy(block))
        norms[a:b], means[a:b] = n.numpy(), m.numpy()
    for arr in (emb, patches, norms, means):
        arr.flush()
    np.save(folder / "labels.npy", labels)


def _mapped(folder: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="r+"))


def reduce(folder: Path, d: int, chunk: int = 20000) -> None:
    """The reduced grids of the gallery in ``folder`` (what the feature cache stores for
    ``rerank.patch_dim=d``): basis, float16 ``(G, R, d)`` grids, their norms and means."""
    patches = _mapped(folder, "patches")
    basis = fit_patch_basis(patches, d)
    np.save(folder / f"basis{d}.npy", basis.numpy())
    g, r, _ = patches.shape
    out = np.lib.format.open_memmap(folder / f"patches{d}.npy", "w+", np.float16, (g, r, d))
    norms = np.lib.format.open_memmap(folder / f"norms{d}.npy", "w+", np.float32, (g, r))
    means = np.lib.format.open_memmap(folder / f"means{d}.npy", "w+", np.float32, (g, d))
    for a in range(0, g, chunk):
        block = project_patches(patches[a : a + chunk], basis).half()
        out[a : a + chunk] = block.numpy()
        n, m = patch_summaries(block)
        norms[a : a + chunk], means[a : a + chunk] = n.numpy(), m.numpy()
    for arr in (out, norms, means):
        arr.flush()


class AnonPeak:
    """Samples the process's anonymous (private) resident memory, RssAnon, every 20 ms.

    ru_maxrss also counts the file pages of the memory-mapped gallery that were read; those
    are clean page cache the kernel drops under pressure, so both figures are printed."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now(field: str = "RssAnon") -> int:
        """A ``/proc/self/status`` memory field in MB (VmHWM: peak RSS of this process image;
        unlike ru_maxrss it is not inherited from the parent across fork + exec)."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def child(
    folder: Path, queries: int, top_k: int, query_batch: int | None, index: str,
    patch_dim: int | None = None, refine_top: int | None = None,
) -> dict:  # fmt: skip
    torch.set_num_threads(2)
    anon = AnonPeak()
    emb, patches = _mapped(folder, "emb"), _mapped(folder, "patches")
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    # per-item summaries mapped too: stage 2 reads only its candidates' rows (2 GB at 1M)
    summaries = (_mapped(folder, "norms"), _mapped(folder, "means"))
    # generated finite data with stored summaries: what a verified cache entry provides
    gallery = FeatureBank(emb, patches, labels, summaries=summaries, verified=True)
    rng = torch.Generator().manual_seed(1)
    rows = torch.randperm(len(gallery), generator=rng)[:queries]
    q_emb = emb[rows].float() + 1.5 * torch.randn(queries, emb.shape[1], generator=rng)
    q_patches = patches[rows].float() + 0.6 * torch.randn(
        queries, *patches.shape[1:], generator=rng
    )
    query = FeatureBank(q_emb, q_patches, labels[rows])
    cfg = RerankConfig(
        top_k=top_k, weighting="apc", tol=1e-3, query_batch=query_batch, stage1_index=index,
        patch_dim=patch_dim, refine_top=refine_top,
    )  # fmt: skip
    t0 = time.perf_counter()
    if patch_dim is not None:  # the stored reduced grids; the queries projected here
        reduced = (_mapped(folder, f"norms{patch_dim}"), _mapped(folder, f"means{patch_dim}"))
        basis = torch.from_numpy(np.load(folder / f"basis{patch_dim}.npy"))
        gallery = project_bank(gallery, basis, _mapped(folder, f"patches{patch_dim}"), reduced)
        query = project_bank(query, basis)
    ranking = two_stage_rank(query, gallery, cfg)
    total = time.perf_counter() - t0
    extra = {}
    if index != "exact":  # recall of the exhaustive top-k, and the exhaustive stage 1's time
        t0 = time.perf_counter()
        exact = stage1_topk(query.embeddings, gallery.embeddings, top_k)[1]
        extra["exact_stage1_ms_per_query"] = round(1e3 * (time.perf_counter() - t0) / queries, 2)
        found = ranking.stage1_index[:, :top_k]
        hits = (found[:, :, None] == exact[:, None, :]).any(-1).float().mean()
        extra["recall_at_k"] = round(float(hits), 4)
    return {
        "index": index,
        "patch_dim": patch_dim or patches.shape[2],
        "refine_top": refine_top,
        **extra,
        "gallery": len(gallery),
        "queries": queries,
        "stage1_s": round(ranking.stage1_seconds, 2),
        "stage2_s": round(ranking.stage2_seconds, 2),
        "stage1_ms_per_query": round(1e3 * ranking.stage1_seconds / queries, 2),
        "stage2_ms_per_query": round(1e3 * ranking.stage2_seconds / queries, 2),
        "total_s": round(total, 2),
        "peak_rss_mb": AnonPeak.now("VmHWM"),
        "peak_anon_mb": anon.stop(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to generate")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--query-batch", type=int, default=None, help="default: automatic")
    parser.add_argument(
        "--index", nargs="+", default=["exact"], help="stage-1 index per run: exact and/or ivf"
    )
    parser.add_argument(
        "--patch-dim", nargs="+", default=["full"], help="per run: full and/or a dimension d"
    )
    parser.add_argument("--refine-top", type=int, default=None, help="with a d: rerank.refine_top")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dims = [None if d == "full" else int(d) for d in args.patch_dim]
    if args.child:
        out = child(args.child, args.queries, args.top_k, args.query_batch, args.index[0],
                    dims[0], args.refine_top)  # fmt: skip
        print(json.dumps(out))
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            t0 = time.perf_counter()
            generate(Path(tmp), size, 128, 16, 512)
            gen = time.perf_counter() - t0
            for d, index in [(d, i) for d in dims for i in args.index]:
                reduce_s = 0.0
                if d is not None and not (Path(tmp) / f"patches{d}.npy").is_file():
                    t0 = time.perf_counter()
                    reduce(Path(tmp), d)
                    reduce_s = time.perf_counter() - t0
                refine = [] if d is None or args.refine_top is None else [
                    "--refine-top", str(args.refine_top)]  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--child", tmp, "--queries", str(args.queries),
                     "--top-k", str(args.top_k), "--index", index,
                     "--patch-dim", "full" if d is None else str(d), *refine,
                     *(["--query-batch", str(args.query_batch)] if args.query_batch else [])],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["generate_s"], row["reduce_s"] = round(gen, 1), round(reduce_s, 1)
                name = "patches.npy" if d is None else f"patches{d}.npy"
                row["grid_bytes_per_item"] = (Path(tmp) / name).stat().st_size // size
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| gallery | stage 1 | patch dim (refine) | queries | stage 1 ms/query | "
        "stage 2 ms/query | total s | peak RSS MB | peak anon MB | grid bytes/item | "
        "recall@k (exact stage 1 ms/query) | generate s | reduce s |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        recall = (
            f"{r['recall_at_k']} ({r['exact_stage1_ms_per_query']})" if "recall_at_k" in r else "-"
        )
        dim = f"{r['patch_dim']}" + (f" ({r['refine_top']})" if r["refine_top"] else "")
        print(
            f"| {r['gallery']:,} | {r['index']} | {dim} | {r['queries']} | "
            f"{r['stage1_ms_per_query']} | {r['stage2_ms_per_query']} | {r['total_s']} | "
            f"{r['peak_rss_mb']:,} | {r['peak_anon_mb']:,} | {r['grid_bytes_per_item']:,} | "
            f"{recall} | {r['generate_s']} | {r['reduce_s']} |"
        )


if __name__ == "__main__":
    main()
