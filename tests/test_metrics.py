"""Identification metrics against a brute-force numpy reference over the full gallery."""

import numpy as np
import pytest
import torch

from faceemd.emd import stage1_topk
from faceemd.metrics import (
    hits_from_ranking,
    identification_metrics,
    relevant_counts,
)


def _reference(sim, q_labels, g_labels, exclude):
    """Full-sort reference: P@1, RP, MAP@R per Musgrave et al., R = 0 queries skipped."""
    p1, rp, mapr, skipped = [], [], [], 0
    for i in range(sim.shape[0]):
        s = sim[i].copy()
        keep = np.ones(len(g_labels), bool)
        if exclude[i] >= 0:
            keep[exclude[i]] = False
        order = [j for j in np.argsort(-s, kind="stable") if keep[j]]
        rel = np.array([g_labels[j] == q_labels[i] for j in order])
        r = int(rel.sum())
        if r == 0:
            skipped += 1
            continue
        p1.append(float(rel[0]))
        rp.append(rel[:r].sum() / r)
        prec = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        mapr.append(float((prec * rel[:r]).sum() / r))
    return np.mean(p1), np.mean(rp), np.mean(mapr), skipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_bruteforce_with_self_exclusion(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = torch.from_numpy(rng.integers(0, 15, n))
    emb = torch.from_numpy(rng.standard_normal((n, 8))).float()
    exclude = torch.arange(n)  # query i is gallery item i
    r = relevant_counts(labels, labels, exclude)
    depth = int(r.max())
    _, idx = stage1_topk(emb, emb, depth, exclude, chunk_size=7)
    got = identification_metrics(hits_from_ranking(idx, labels, labels), r)
    en = torch.nn.functional.normalize(emb, dim=1)
    ref = _reference((en @ en.T).numpy(), labels.numpy(), labels.numpy(), exclude.numpy())
    assert got["p_at_1"] == pytest.approx(ref[0], abs=1e-9)
    assert got["r_precision"] == pytest.approx(ref[1], abs=1e-9)
    assert got["map_at_r"] == pytest.approx(ref[2], abs=1e-9)
    assert got["num_excluded"] == ref[3]
    assert got["num_queries"] == n - ref[3]


def test_hand_computed_case_and_r_zero():
    # query 0 (label 0): ranking labels [1, 0, 0]; R = 2 -> P@1 0, RP 1/2, MAP@R (1/2)/2 = 0.25
    # query 1 (label 5): no relevant item -> excluded
    g_labels = torch.tensor([1, 0, 0, 2])
    q_labels = torch.tensor([0, 5])
    idx = torch.tensor([[0, 1, 2], [3, 2, 1]])
    r = relevant_counts(q_labels, g_labels)
    assert r.tolist() == [2, 0]
    out = identification_metrics(
        hits_from_ranking(idx, q_labels, g_labels), r, hits_from_ranking(idx, q_labels, g_labels), 2
    )
    assert out["p_at_1"] == 0.0
    assert out["r_precision"] == 0.5
    assert out["map_at_r"] == 0.25
    assert out["max_precision_at_k"] == 1.0
    assert out["num_excluded"] == 1


def test_too_shallow_ranking_is_an_error():
    with pytest.raises(ValueError, match="rank at least"):
        identification_metrics(torch.ones(2, 2, dtype=torch.bool), torch.tensor([3, 1]))


def _reference_public(sim, labels):
    """The public DeepFace-EMD definition on a query-equals-gallery set, written out: the own
    image is not ranked but counts in R (``num_pos`` = gallery items with the label)."""
    rp, mapr = [], []
    for i in range(sim.shape[0]):
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        rel = np.array([labels[j] == labels[i] for j in order] + [False])  # own image: never
        r = int((labels == labels[i]).sum())
        if r == 1:
            continue  # no other relevant image: excluded as in the default definition
        rp.append(rel[:r].sum() / r)
        mapr.append(float((np.cumsum(rel[:r]) / np.arange(1, r + 1) * rel[:r]).sum() / r))
    return np.mean(rp), np.mean(mapr)


@pytest.mark.parametrize("seed", [0, 1])
def test_public_r_definition_matches_bruteforce_through_evaluate_features(seed):
    from faceemd.emd import FeatureBank, RerankConfig
    from faceemd.ranking import evaluate_features

    rng = np.random.default_rng(seed)
    n = 50
    labels = torch.from_numpy(rng.integers(0, 12, n))
    emb = torch.from_numpy(rng.standard_normal((n, 8))).float()
    bank = FeatureBank(emb, torch.zeros(n, 1, 2), labels)
    cfg = RerankConfig(top_k=5, alpha=0.0)
    public, _ = evaluate_features(bank, bank, cfg, True, r_counts_query=True)
    default, _ = evaluate_features(bank, bank, cfg, True)
    en = torch.nn.functional.normalize(emb, dim=1)
    ref_rp, ref_mapr = _reference_public((en @ en.T).numpy(), labels.numpy())
    assert public["stage1/r_precision"] == pytest.approx(ref_rp, abs=1e-9)
    assert public["stage1/map_at_r"] == pytest.approx(ref_mapr, abs=1e-9)
    assert public["stage1/p_at_1"] == default["stage1/p_at_1"]
    assert public["stage1/r_precision"] != default["stage1/r_precision"]


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_scores_match_a_loop_over_random_hit_tables(seed):
    """Hit tables not made by a ranking (any pattern, R from 0 to the depth) against the
    textbook formulas written per query."""
    from faceemd.metrics import per_query_scores

    rng = np.random.default_rng(seed)
    q, depth = 40, 25
    hits = rng.random((q, depth)) < rng.uniform(0.05, 0.6, (q, 1))
    r = rng.integers(0, depth + 1, q)
    got = per_query_scores(torch.from_numpy(hits), torch.from_numpy(r))
    for i in range(q):
        if r[i] == 0:
            assert all(np.isnan(float(v[i])) for v in got.values())
            continue
        rel = hits[i, : r[i]].astype(float)
        map_r = (np.cumsum(rel) / np.arange(1, r[i] + 1) * rel).sum() / r[i]
        assert float(got["p_at_1"][i]) == float(hits[i, 0])
        assert float(got["r_precision"][i]) == pytest.approx(rel.sum() / r[i], abs=1e-12)
        assert float(got["map_at_r"][i]) == pytest.approx(map_r, abs=1e-12)
