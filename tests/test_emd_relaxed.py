"""The relaxed EMD (faceemd.emd.relaxed) against POT's exact LP and a hand-worked case."""

import ot
import pytest
import torch

from faceemd.emd.relaxed import relaxed_emd


def test_a_hand_worked_case():
    """Two query patches (mass 0.5 each), two candidate patches (0.8, 0.2); costs
    [[0, 1], [0.5, 0.4]]. Query side: 0.5 * 0 + 0.5 * 0.4 = 0.2. Candidate side:
    0.8 * 0 + 0.2 * 0.4 = 0.08. Relaxed cost max(0.2, 0.08) = 0.2; the exact EMD moves 0.5
    at 0 and 0.3 at 0.5, 0.2 at 0.4: 0.23."""
    cost = torch.tensor([[0.0, 1.0], [0.5, 0.4]])
    sim = (1 - cost).view(1, 1, 2, 2)
    u, v = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.8, 0.2]]])
    out = relaxed_emd(sim, u, v)
    assert out.distance.item() == pytest.approx(0.2, abs=1e-6)
    assert out.similarity.item() == pytest.approx(0.8, abs=1e-6)
    exact = ot.emd2([0.5, 0.5], [0.8, 0.2], cost.double().numpy())
    assert exact == pytest.approx(0.23, abs=1e-6)  # float32 inputs


def test_it_bounds_the_exact_emd_from_below_on_random_problems():
    """200 random 9x7 problems with random weights (unnormalised: each is normalised): the
    relaxed cost is never above POT's exact cost (tolerance 1e-6) and is the exact cost where
    one side has a single patch (then every plan is the nearest-patch plan)."""
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(10, 20, 9, 7, generator=g) * 2 - 1
    u, v = torch.rand(10, 20, 9, generator=g) + 0.1, torch.rand(10, 20, 7, generator=g) + 0.1
    out = relaxed_emd(sim, u, v)
    for b in range(10):
        for k in range(20):
            a, c = u[b, k] / u[b, k].sum(), v[b, k] / v[b, k].sum()
            exact = ot.emd2(a.double().numpy(), c.double().numpy(),
                            (1 - sim[b, k]).double().numpy())  # fmt: skip
            assert out.distance[b, k].item() <= exact + 1e-6
    single = relaxed_emd(sim[:, :, :1], u[:, :, :1], v)
    for k in range(20):
        exact = (v[0, k] / v[0, k].sum() * (1 - sim[0, k, 0])).sum()
        assert single.distance[0, k].item() == pytest.approx(exact.item(), abs=1e-6)


def test_leading_weight_sets_and_bad_shapes():
    sim = torch.rand(2, 3, 4, 4)
    u, v = torch.rand(5, 2, 3, 4), torch.rand(5, 2, 3, 4)
    out = relaxed_emd(sim, u, v)
    assert out.similarity.shape == (5, 2, 3)
    assert torch.equal(out.similarity[1], relaxed_emd(sim, u[1], v[1]).similarity)
    with pytest.raises(ValueError, match="weights do not match"):
        relaxed_emd(sim, u[..., :3], v)
