"""Adversarial query sets made from a face set by attacking a surrogate model (paper Sec. 4.2).

TALFW (Tab. 3) is 4,069 adversarially perturbed LFW faces ranked against the clean LFW gallery;
it cannot be downloaded here, so :class:`AdversarialFaces` makes such a set with the same
intent: each face of ``source`` is perturbed (:func:`faceemd.data.attack.dodge`: MI-FGSM or
PGD, L-inf budget in 8-bit levels, the dodging objective) so that the **surrogate** model no
longer matches it to its clean self, and written losslessly (PNG) under
``out_root/adversarial-<key>/``. The key hashes the source set's fingerprint, the attack
settings, the data's frame, and the surrogate: its name, input spec and a digest of its
weights (so another checkpoint makes another set). The model that is *evaluated* is the run's
``backbone``, chosen separately: transfer (surrogate != backbone, as TALFW) or white-box.

Like the occluded sets (:mod:`faceemd.data.materialised`), the set is made once, resumes where
a killed run stopped, and is reused by later runs and sweep jobs. Each manifest line carries the
image's perturbation norms (``linf`` and ``l2`` in levels) and the surrogate's cosine to the
clean embedding after the attack; :meth:`AdversarialFaces.attack_summary` aggregates them for
``metrics.json``. The source's landmarks are kept (the attack does not move the face).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.fx.experimental.optimization import fuse

from faceemd.data.attack import AttackSettings, DifferentiableInput, dodge, random_start
from faceemd.data.materialised import MaterialisedFaces, source_stamps
from faceemd.data.transforms import FaceInput
from faceemd.storage.manifest import Manifest

__all__ = ["DIFFERENTIABLE_BACKBONES", "AdversarialFaces", "weights_digest"]

log = logging.getLogger(__name__)

# Backbone configs that run in torch (autograd), i.e. can be attacked.
DIFFERENTIABLE_BACKBONES = (
    "mobilefacenet",
    "torch",
    "arcface_r18",
    "facenet",
    "cosface_sphere20",
    "tiny_cnn",
)


def weights_digest(net: torch.nn.Module) -> str:
    """SHA-256 of a module's class and state dict (names, shapes, values): what identifies the
    surrogate in the recipe, whatever file its weights came from."""
    h = hashlib.sha256(f"{type(net).__module__}.{type(net).__qualname__}".encode())
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class AdversarialFaces(MaterialisedFaces):
    """Adversarial copies of ``source``, made against ``surrogate`` and materialised under
    ``out_root``.

    source: a face set whose items are ``(image, name, landmarks)``; surrogate: a backbone
    config mapping (``conf/backbone/*.yaml``: ``name``, ``net``, ``weights``, ``input``, ...)
    of a PyTorch model; frame: the template the source images are aligned to (None: unknown,
    images are resized to the surrogate's input); attack: :class:`AttackSettings` fields;
    batch_size: images attacked together (the result does not depend on it); seed: base seed of
    each image's random start (drawn from ``(seed, crc32(relative path))``); precision:
    ``float32`` or ``float64`` (2.3x slower on MobileFaceNet; an image's result is then the same
    in any batch, so a resumed run makes the same images as an uninterrupted one; in float32 a
    few pixels whose gradient is within rounding of zero can differ, see
    :mod:`faceemd.data.attack`); on_bad_image:
    ``error`` or ``skip`` (unreadable source image).
    """

    def __init__(
        self,
        source,
        surrogate,
        out_root,
        attack: dict | None = None,
        frame: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        precision: str = "float32",
        on_bad_image: str = "error",
    ) -> None:
        from faceemd.models.build import build_backbone

        self.settings = AttackSettings(**dict(attack or {}))
        if not isinstance(surrogate, DictConfig):  # a plain mapping from Python
            surrogate = OmegaConf.create(dict(surrogate), flags={"allow_objects": True})
        name = surrogate.get("name", "?")
        net = build_backbone(surrogate)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError(
                f"surrogate backbone {name!r} cannot be differentiated (an ONNX graph runs in "
                "onnxruntime, outside autograd); attack a PyTorch backbone: "
                f"{', '.join(DIFFERENTIABLE_BACKBONES)} (e.g. backbone@data.query.surrogate="
                "mobilefacenet), and evaluate the ONNX model as the run's backbone (transfer)"
            )
        net = net.eval().requires_grad_(False)
        digest = weights_digest(net)
        try:  # eval-mode batch norm folded into the convolutions: 1.3x on MobileFaceNet
            net = fuse(net)
        except Exception as err:  # noqa: BLE001 - a module torch.fx cannot trace runs as it is
            log.info("surrogate %s runs unfused (%s: %s)", name, type(err).__name__, err)
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.model = net.to(getattr(torch, precision))
        face_input = FaceInput.from_config(surrogate["input"]).in_frame(frame)
        self.prepare = DifferentiableInput(face_input)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        stamps = source_stamps(source)
        found = source.fingerprint() if stamps is None else source.fingerprint(stamps=stamps)
        recipe = {
            "source": found,
            "attack": self.settings.recipe(),
            "frame": frame,
            "seed": self.seed,
            "precision": precision,
            "surrogate": {
                "name": name,
                "weights_sha256": digest,
                "input": [
                    list(face_input.size),
                    face_input.channels,
                    list(face_input.mean)
                    if isinstance(face_input.mean, tuple)
                    else face_input.mean,
                    list(face_input.std) if isinstance(face_input.std, tuple) else face_input.std,
                    face_input.colour,
                    face_input.template,
                ],
            },  # fmt: skip
            "v": 1,
        }
        self.recipe = recipe
        super().__init__(source, recipe, out_root, "adversarial", on_bad_image, stamps)

    def make_batch(self, items: list[tuple[int, np.ndarray, np.ndarray, str]]) -> list:
        """Attack the images of ``items`` together, one forward/backward batch per image shape."""
        out: list = [None] * len(items)
        shapes: dict[tuple, list[int]] = {}
        for pos, (_, image, _, _) in enumerate(items):
            shapes.setdefault(image.shape, []).append(pos)
        for positions in shapes.values():
            batch = np.stack([items[p][1] for p in positions])
            pixels = torch.from_numpy(batch)
            pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
            start = torch.stack(
                [random_start(tuple(pixels.shape[1:]), self.seed, items[p][3]) for p in positions]
            )
            adv, stats = dodge(self.model, self.prepare, pixels.contiguous(), start, self.settings)
            adv = adv[:, 0] if batch.ndim == 3 else adv.permute(0, 2, 3, 1)
            for j, p in enumerate(positions):
                extra = {
                    "linf": int(stats["linf"][j]),
                    "l2": round(float(stats["l2"][j]), 3),
                    "surrogate_cos": round(float(stats["cos_after"][j]), 5),
                }
                out[p] = (adv[j].numpy(), items[p][2], extra)
        return out

    def finished(self) -> None:
        self.model = self.prepare = None  # not for the loader workers

    def attack_summary(self) -> dict[str, float]:
        """Perturbation norms over the set's images, in 8-bit levels (``linf_max``,
        ``linf_mean``, ``l2_mean``, ``l2_max``), the budget, and the surrogate's mean cosine
        between each adversarial and clean embedding (``surrogate_cos_mean``)."""
        done = Manifest(self.root).done
        rows = [done[rel] for rel in self.files]
        linf = np.array([r["linf"] for r in rows], np.float64)
        l2 = np.array([r["l2"] for r in rows], np.float64)
        cos = np.array([r["surrogate_cos"] for r in rows], np.float64)
        return {
            "eps_levels": float(self.settings.eps_levels),
            "linf_max": float(linf.max()),
            "linf_mean": float(linf.mean()),
            "l2_mean": float(l2.mean()),
            "l2_max": float(l2.max()),
            "surrogate_cos_mean": float(cos.mean()),
        }
