"""DeepFace-EMD method core: plain tensor code, no Lightning or Hydra (paper Sec. 2.3-2.5)."""

from faceemd.emd.cost import patch_cosine, quantize_patches
from faceemd.emd.exact import exact_emd
from faceemd.emd.rerank import (
    FeatureBank,
    Ranking,
    RerankConfig,
    check_finite,
    pairwise_emd,
    stage1_topk,
    stage2_rerank,
    two_stage_rank,
)
from faceemd.emd.sinkhorn import EMDResult, sinkhorn
from faceemd.emd.weights import (
    WEIGHTINGS,
    compute_weights,
    grid_to_patches,
    landmark_density,
    normalise_weights,
)

__all__ = [
    "EMDResult",
    "FeatureBank",
    "Ranking",
    "RerankConfig",
    "WEIGHTINGS",
    "check_finite",
    "compute_weights",
    "exact_emd",
    "grid_to_patches",
    "landmark_density",
    "normalise_weights",
    "pairwise_emd",
    "patch_cosine",
    "quantize_patches",
    "sinkhorn",
    "stage1_topk",
    "stage2_rerank",
    "two_stage_rank",
]
