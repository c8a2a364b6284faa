"""DeepFace-EMD method core: plain tensor code, no Lightning or Hydra (paper Sec. 2.3-2.5)."""

from faceemd.emd.bank import FeatureBank, Ranking, check_finite, nonfinite_rows, patch_summaries
from faceemd.emd.cost import patch_cosine, quantize_patches
from faceemd.emd.exact import exact_emd
from faceemd.emd.problems import emd_problems, pairwise_emd, solve_problems
from faceemd.emd.rerank import two_stage_rank
from faceemd.emd.settings import RerankConfig
from faceemd.emd.sinkhorn import EMDResult, sinkhorn
from faceemd.emd.stage1 import stage1_topk
from faceemd.emd.stage2 import (
    blend_stage2,
    prepare_gallery,
    stage2_rerank,
    stage2_scores,
    stage2_scores_for,
)
from faceemd.emd.weights import (
    WEIGHTINGS,
    CandidateInputs,
    QueryInputs,
    compute_weights,
    grid_to_patches,
    landmark_density,
    normalise_weights,
)

__all__ = [
    "CandidateInputs",
    "EMDResult",
    "FeatureBank",
    "QueryInputs",
    "Ranking",
    "RerankConfig",
    "WEIGHTINGS",
    "blend_stage2",
    "check_finite",
    "compute_weights",
    "emd_problems",
    "exact_emd",
    "grid_to_patches",
    "landmark_density",
    "nonfinite_rows",
    "normalise_weights",
    "pairwise_emd",
    "patch_cosine",
    "patch_summaries",
    "prepare_gallery",
    "quantize_patches",
    "sinkhorn",
    "solve_problems",
    "stage1_topk",
    "stage2_rerank",
    "stage2_scores",
    "stage2_scores_for",
    "two_stage_rank",
]
