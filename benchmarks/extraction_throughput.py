"""Extraction throughput: evaluate.py's real extraction path against bare loops over the same
images, in one run.

Usage: python benchmarks/extraction_throughput.py [--experiment real_lfw_mobilefacenet]
       [--data lfw_mask] [--images 640] [--threads 2] [--repeats 2]
       python benchmarks/extraction_throughput.py --experiment none   # synthetic default

The real path is :func:`faceemd.jobs.extraction.load_or_extract` with the feature cache off, on the
first ``--images`` query images of the configured protocol: files -> decode -> occlusion (the
protocol's materialised copies) -> input transform -> DataLoader workers -> Lightning test loop
-> backbone -> collected features. It runs twice, with the backbone as loaded (``before``:
``extraction.fold_batchnorm=false extraction.channels_last=false``, and for ONNX backbones
``backbone.net.fold_dequantize=false``) and prepared for inference
(each ``extraction.runtime``: ``torch`` folded + channels_last, ``onnxruntime``). The bare loops run the same network on the same images already
decoded into one tensor, in ``torch.inference_mode()``, batch by batch: NCHW as loaded,
channels_last, folded + channels_last, and (torch backbones) onnxruntime on the in-memory ONNX export.
Prints images/second of each (best of ``--repeats``), the ratios after/before and real
path / best bare loop, and the largest feature difference between before and after. A
protocol whose data is missing (../shared absent) is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from faceemd.data.datamodule import PreparedFaces  # noqa: E402
from faceemd.data.train_datamodule import FaceSubset  # noqa: E402
from faceemd.jobs.extraction import load_or_extract  # noqa: E402
from faceemd.models.build import build_backbone, build_face_input  # noqa: E402
from faceemd.models.inference import (  # noqa: E402
    RUNTIMES,
    ExtractionSettings,
    prepare_for_inference,
)

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(experiment: str | None, data: str | None, extra: list[str], cache: str = "off"):
    """evaluate.py's config for ``experiment`` / ``data`` (None: defaults) with ``extra``
    overrides, outputs under the checkout's ``outputs/``."""
    overrides = [
        f"cache={cache}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"paths.root_dir={ROOT}",
        f"paths.log_dir={ROOT / 'outputs'}",
        "paths.output_dir=${paths.log_dir}/bench",
        *extra,
    ]
    if experiment:
        overrides.append(f"experiment={experiment}")
    if data:
        overrides.append(f"data={data}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def real_path(cfg, images: int, flags: list[str], repeats: int):
    """images/s of load_or_extract on the first ``images`` query images, and the features."""
    cfg = compose_cfg(*cfg, flags)
    backbone = build_backbone(cfg.backbone)
    dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    dm.setup("test")
    dm.query = FaceSubset(dm.query, range(min(images, len(dm.query))))
    dm.gallery = None  # only the query subset is extracted
    best, feats = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        feats, _, _ = load_or_extract(cfg, backbone, dm, [], None)
        best = max(best, len(dm.query) / (time.perf_counter() - t0))
    return best, feats["query"], backbone, dm, cfg


def bare(net, x: torch.Tensor, batch: int, repeats: int) -> float:
    """images/s of ``net`` over ``x`` in batches, in inference mode (best of ``repeats``)."""
    best = 0.0
    with torch.inference_mode():
        net(x[:batch])  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                net(x[i : i + batch])
            best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="real_lfw_mobilefacenet", help="'none': default")
    parser.add_argument("--data", default="lfw_mask")
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = None if args.experiment == "none" else args.experiment
    data = None if experiment is None else args.data
    if experiment and not (ROOT / "../shared").is_dir():
        print(f"skipped: {experiment} needs ../shared (real data and weights)")
        return
    job = (experiment, data)
    plain = ["extraction.runtime=torch", "extraction.fold_batchnorm=false",
             "extraction.channels_last=false"]  # fmt: skip
    if "fold_dequantize" in compose_cfg(experiment, data, []).backbone.net:
        plain.append("backbone.net.fold_dequantize=false")  # ONNX: weights dequantised per batch
    before, f_before, backbone, dm, cfg = real_path(job, args.images, plain, args.repeats)
    paths = {
        runtime: real_path(job, args.images, [f"extraction.runtime={runtime}"], args.repeats)
        for runtime in RUNTIMES
    }
    n = len(dm.query)
    x = torch.stack(
        [PreparedFaces(dm.query, dm.face_input, dm.vocab)[i]["image"] for i in range(n)]
    )
    batch = int(cfg.data.batch_size)
    shape = tuple(x.shape[1:])
    loops = {"NCHW as loaded": bare(backbone, x, batch, args.repeats)}
    if any(True for _ in backbone.parameters()):
        cl = prepare_for_inference(
            backbone, shape, ExtractionSettings("torch", fold_batchnorm=False)
        )
        loops["channels_last"] = bare(cl, x, batch, args.repeats)
        folded = prepare_for_inference(backbone, shape, ExtractionSettings("torch"))
        loops["folded + channels_last"] = bare(folded, x, batch, args.repeats)
        ort = prepare_for_inference(backbone, shape, ExtractionSettings("onnxruntime"))
        loops["onnxruntime"] = bare(ort, x, batch, args.repeats)
    best_name = max(loops, key=loops.get)
    diff = max(
        float((getattr(f, t) - getattr(f_before, t)).abs().max() / getattr(f_before, t).abs().max())
        for _, f, *_ in paths.values()
        for t in ("embeddings", "patches")
    )
    default = compose_cfg(experiment, data, []).extraction.runtime
    after = paths[default][0]
    name = experiment or "synthetic default"
    print(f"{name} / {data or 'synthetic'} ({n} query images, {args.threads} threads, batch {batch}, "
          f"flip_test {cfg.backbone.flip_test}):")  # fmt: skip
    print(f"  real path before (torch NCHW as loaded) {before:.1f} img/s")
    for runtime, (speed, *_) in paths.items():
        print(f"  real path prepared, runtime {runtime}: {speed:.1f} img/s | /before "
              f"{speed / before:.2f}")  # fmt: skip
    for k, v in loops.items():
        print(f"  bare loop {k}: {v:.1f} img/s")
    print(f"  real path with the default runtime ({default}) / best bare loop ({best_name}) "
          f"{after / loops[best_name]:.2f} | max relative feature difference prepared vs "
          f"before {diff:.1e}")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
