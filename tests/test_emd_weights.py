"""Patch weightings (paper Eq. 6-8, LMK) on hand-computed tiny cases."""

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import (
    WEIGHTINGS,
    CandidateInputs,
    QueryInputs,
    compute_weights,
    grid_to_patches,
    landmark_density,
    patch_cosine,
)
from faceemd.emd.weights import pool_patches, weight_probe

# Query: 2 patches in 2-D; one candidate with 2 patches.
Q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (B=1, R=2, C=2)
G = torch.tensor([[[[3.0, 0.0], [-1.0, -1.0]]]])  # (B=1, K=1, R=2, C=2)
SIM = patch_cosine(Q, G)  # cos: q0-g0 = 1, q0-g1 = -1/sqrt2, q1-g0 = 0, q1-g1 = -1/sqrt2


def test_uniform():
    u, v = compute_weights("uniform", SIM, QueryInputs(Q), CandidateInputs(G))
    assert_close(u, torch.full((1, 1, 2), 0.5))
    assert_close(v, torch.full((1, 1, 2), 0.5))


def test_apc_dot_hand_computed():
    # mean(G) = (1, -0.5): <q0, .> = 1, <q1, .> = -1 -> clamp 0 -> u = (1, 0)
    # mean(Q) = (0.5, 1): <g0, .> = 1.5, <g1, .> = -1.5 -> v = (1, 0)
    u, v = compute_weights("apc_dot", SIM, QueryInputs(Q), CandidateInputs(G))
    assert_close(u, torch.tensor([[[1.0, 0.0]]]))
    assert_close(v, torch.tensor([[[1.0, 0.0]]]))


# The fidelity issue's case: query patches (1,0), (0,3); gallery patches (1,1), (2,0).
Q2 = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
G2 = torch.tensor([[[[1.0, 1.0], [2.0, 0.0]]]])


def test_apc_public_code_form_hand_computed():
    """Cosines, not dot products: mean(G) = (1.5, 0.5) -> cos with q = (3/sqrt10, 1/sqrt10)
    -> u = (0.75, 0.25); mean(Q) = (0.5, 1.5) -> cos with g = (2/sqrt5, 1/sqrt10)."""
    u, v = compute_weights("apc", patch_cosine(Q2, G2), QueryInputs(Q2), CandidateInputs(G2))
    assert_close(u, torch.tensor([[[0.75, 0.25]]]))
    cv = torch.tensor([2 / 5**0.5, 1 / 10**0.5])
    assert_close(v, (cv / cv.sum()).view(1, 1, 2))  # (0.7388, 0.2612)
    # Eq. 7 as printed: <q, (1.5, 0.5)> = (1.5, 1.5); <g, (0.5, 1.5)> = (2, 1)
    u, v = compute_weights("apc_dot", patch_cosine(Q2, G2), QueryInputs(Q2), CandidateInputs(G2))
    assert_close(u, torch.tensor([[[0.5, 0.5]]]))
    assert_close(v, torch.tensor([[[2 / 3, 1 / 3]]]))


def test_cc_uses_embeddings():
    qe = torch.tensor([[1.0, 1.0]])
    ge = torch.tensor([[[0.0, 1.0]]])
    # dot: u_i = <q_i, ge> = (0, 2) -> (0, 1); v_j = <g_j, qe> = (3, -2) -> (1, 0)
    u, v = compute_weights("cc_dot", SIM, QueryInputs(Q, qe), CandidateInputs(G, ge))
    assert_close(u, torch.tensor([[[0.0, 1.0]]]))
    assert_close(v, torch.tensor([[[1.0, 0.0]]]))
    # public code: cosines; on Q2/G2 u_i = cos(q_i, (0,1)) = (0, 1), v_j = cos(g_j, (1,1))
    # = (1, 1/sqrt2)
    u, v = compute_weights("cc", patch_cosine(Q2, G2), QueryInputs(Q2, qe), CandidateInputs(G2, ge))
    assert_close(u, torch.tensor([[[0.0, 1.0]]]))
    cv = torch.tensor([1.0, 2**-0.5])
    assert_close(v, (cv / cv.sum()).view(1, 1, 2))
    with pytest.raises(ValueError, match="D = C"):
        compute_weights(
            "cc", SIM, QueryInputs(Q, torch.ones(1, 3)), CandidateInputs(G, torch.ones(1, 1, 3))
        )


def test_sc_public_distance_form_and_eq8_disagree_on_a_negative_patch():
    """g1 = (-1, -1) correlates negatively with both query patches: the distance form (public
    code, ``sc``) gives it the most weight, Eq. 8's similarity form (``sc_eq8``) none."""
    s = 2**-0.5
    u, v = compute_weights("sc", SIM, QueryInputs(Q), CandidateInputs(G))
    # distance row sums: (0 + 1 + s, 1 + 1 + s); column sums: (0 + 1, 2 + 2s)
    ru = torch.tensor([1 + s, 2 + s])
    rv = torch.tensor([1.0, 2 + 2 * s])
    assert_close(u, (ru / ru.sum()).view(1, 1, 2))
    assert_close(v, (rv / rv.sum()).view(1, 1, 2))
    u, v = compute_weights("sc_eq8", SIM, QueryInputs(Q), CandidateInputs(G))
    # similarity row sums: 1 - s = 0.2929, -s -> 0; column sums: 1, -2s -> 0
    assert_close(u, torch.tensor([[[1.0, 0.0]]]))
    assert_close(v, torch.tensor([[[1.0, 0.0]]]))


@pytest.mark.parametrize("method", ["apc", "apc_dot", "cc", "cc_dot"])
def test_probe_cosines_give_the_weights_of_the_candidates(method):
    """The stage-2 path (candidates never read: probe cosines, norms, pooled means) equals the
    direct computation from the candidate patches."""
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(2, 9, 6, generator=g), torch.randn(2, 3, 9, 6, generator=g).relu()
    qe, ce = torch.randn(2, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    probe = weight_probe(method, QueryInputs(q, qe))  # (B, 1, C)
    probe_cos = torch.einsum(
        "bkrc,bc->bkr", torch.nn.functional.normalize(c, dim=-1),
        torch.nn.functional.normalize(probe[:, 0], dim=-1),
    )  # fmt: skip
    sim = patch_cosine(q, c)
    want = compute_weights(method, sim, QueryInputs(q, qe), CandidateInputs(c, ce))
    unread = CandidateInputs(torch.empty(0), ce, pooled=c.mean(2), norms=c.norm(dim=-1))
    got = compute_weights(method, sim, QueryInputs(q, qe), unread, candidate_probe=probe_cos)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_landmark_density_counts_points_per_cell():
    # 4x4 image, 2x2 grid: three points in the top-left cell, one bottom-right, one outside.
    pts = torch.tensor([[[0.5, 0.5], [1.0, 1.9], [1.9, 0.0], [3.0, 3.0], [9.0, 9.0]]])
    w = landmark_density(pts, (4, 4), (2, 2))
    assert_close(w, torch.tensor([[0.75, 0.0, 0.0, 0.25]]))
    u, v = compute_weights(
        "lmk",
        SIM,
        QueryInputs(Q, lmk=torch.tensor([[0.25, 0.75]])),
        CandidateInputs(G, lmk=torch.tensor([[[0.5, 0.5]]])),
    )
    assert_close(u, torch.tensor([[[0.25, 0.75]]]))
    assert_close(v, torch.tensor([[[0.5, 0.5]]]))


@pytest.mark.parametrize("method", [m for m in WEIGHTINGS if m not in ("cc", "cc_dot", "lmk")])
def test_random_weights_nonnegative_and_normalised(method):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 16, 8, generator=g)
    c = torch.randn(3, 4, 16, 8, generator=g)
    u, v = compute_weights(method, patch_cosine(q, c), QueryInputs(q), CandidateInputs(c))
    for w in (u, v):
        assert w.shape == (3, 4, 16)
        assert bool((w >= 0).all())
        assert_close(w.sum(-1), torch.ones(3, 4))


def test_grid_pooling_8x8_to_4x4():
    grid = torch.arange(64.0).view(1, 1, 8, 8)
    patches = pool_patches(grid_to_patches(grid), (8, 8), (4, 4))
    assert patches.shape == (1, 16, 1)
    # first 4x4 cell averages rows 0-1, cols 0-1: (0 + 1 + 8 + 9) / 4
    assert float(patches[0, 0, 0]) == pytest.approx(4.5)
    assert grid_to_patches(grid).shape == (1, 64, 1)
    with pytest.raises(ValueError, match="feature map"):
        grid_to_patches(torch.zeros(3, 4))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown weighting"):
        compute_weights("nope", SIM, QueryInputs(Q), CandidateInputs(G))
