"""Ranking figures: flow picture, weight heatmaps, figure layout."""

import numpy as np
import torch

from faceemd.emd import FeatureBank, RerankConfig, pairwise_emd, two_stage_rank
from faceemd.visualize import cell_bounds, flow_picture, query_figure, weight_heatmap


def test_flow_picture_of_a_query_against_itself_reproduces_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (56, 48), np.uint8)
    patches = torch.randn(1, 42, 16)
    cfg = RerankConfig(weighting="uniform", solver="exact")
    result, u, _ = pairwise_emd(patches, patches[:, None], cfg, return_flow=True)
    flow = result.flow[0, 0].numpy()
    assert np.array_equal(flow.argmax(1), np.arange(42))  # identical grids: diagonal flow
    rebuilt = flow_picture(image, image, flow, u[0, 0].numpy(), (7, 6))
    assert np.abs(rebuilt.astype(int) - image).max() <= 1  # float32 share ~1, rounding


def test_flow_picture_moves_cells_and_darkens_by_share():
    query = np.zeros((4, 4), np.uint8)
    gallery = np.array(
        [[10, 10, 20, 20], [10, 10, 20, 20], [30, 30, 40, 40], [30, 30, 40, 40]], np.uint8
    )
    flow = np.array([[0, 0, 0, 0.25], [0.25, 0, 0, 0], [0, 0.125, 0, 0], [0, 0, 0.25, 0]])
    u = np.full(4, 0.25)
    out = flow_picture(query, gallery, flow, u, (2, 2))
    # cell 0 <- gallery cell 3 (40), cell 1 <- cell 0 (10), cell 2 <- cell 1 at half share, 3 <- 2
    assert out[0, 0] == 40 and out[0, 2] == 10 and out[2, 0] == 10 and out[2, 2] == 30


def test_weight_heatmap_is_hottest_in_the_weighted_cell():
    image = np.full((40, 40), 128, np.uint8)
    w = np.zeros(16)
    w[3] = 1.0  # row 0, column 3 of a 4x4 grid: top-right cell
    heat = weight_heatmap(image, w, (4, 4)).astype(int)
    y0, y1, x0, x1 = cell_bounds((40, 40), (4, 4))[3]
    redness = heat[..., 0] - heat[..., 2]
    assert redness[y0:y1, x0:x1].min() > redness[20:, :20].max()


def test_query_figure_layout_and_outlines():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.randn(6, 8)
    patches = torch.randn(6, 16, 8)
    bank = FeatureBank(emb, patches, labels)
    cfg = RerankConfig(top_k=4, weighting="uniform")
    ranking = two_stage_rank(bank, bank, cfg, exclude=torch.arange(6), depth=4)
    images = [np.full((32, 24), 40 * i, np.uint8) for i in range(6)]
    fig = query_figure(0, bank, bank, ranking, cfg, (4, 4), images[0], lambda g: images[g], top=3)
    assert fig.shape == (3 * (32 + 6), 4 * (24 + 6), 3)
    # the outline of stage-2 rank 1 is green iff that gallery face has the query's identity
    first = int(ranking.stage2_index[0, 0])
    border = fig[32 + 6 + 1, (24 + 6) + 1]
    expected = (40, 200, 40) if int(labels[first]) == 0 else (220, 40, 40)
    assert tuple(border) == expected
