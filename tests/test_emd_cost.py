"""Patch cosines in float32 and int8 against direct computations and a rounding-error bound."""

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import (
    FeatureBank,
    RerankConfig,
    patch_cosine,
    quantize_patches,
    stage1_topk,
    stage2_scores,
)


def _patches(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).relu()


def test_float_cosine_matches_direct_formula():
    q, c = _patches(2, 5, 16), _patches(2, 3, 4, 16, seed=1)
    direct = torch.einsum(
        "brc,bksc->bkrs",
        q / q.norm(dim=-1, keepdim=True),
        c / c.norm(dim=-1, keepdim=True),
    )
    assert_close(patch_cosine(q, c), direct, atol=1e-6, rtol=0)
    # Precomputed norms give the same numbers without normalising the candidates first.
    assert_close(patch_cosine(q, c, candidate_norms=c.norm(dim=-1)), direct, atol=1e-6, rtol=0)


def test_quantized_codes_reconstruct_normalised_patches():
    x = _patches(6, 4, 32)
    x[0, 0] = 0.0  # an all-zero patch gets zero codes, like a zero cosine
    codes, scales = quantize_patches(x, chunk_rows=4)  # chunking must not matter
    assert codes.dtype == torch.int8 and scales.shape == (6, 4)
    unit = torch.nn.functional.normalize(x, dim=-1)
    err = (codes.float() * scales.unsqueeze(-1) - unit).abs()
    assert bool((err <= scales.unsqueeze(-1) / 2 + 1e-7).all())  # rounding: half a step
    assert int(codes.abs().max()) == 127
    assert int(codes[0, 0].abs().max()) == 0


def test_int8_cosine_within_rounding_bound():
    q, c = _patches(2, 64, 512), _patches(2, 10, 64, 512, seed=1)
    ref = patch_cosine(q, c).double()
    codes, scales = quantize_patches(c.reshape(-1, 64, 512))
    got = patch_cosine(q, codes.view(2, 10, 64, 512), None, None, scales.view(2, 10, 64))
    # Independent bound: with x~ = s X the dequantised unit vector, |x~ - x| <= s/2 per entry,
    # so |x~.y~ - x.y| <= (|x|_1 s_y + |y|_1 s_x) / 2 + C s_x s_y / 4.
    _, qs = quantize_patches(q)
    qn = torch.nn.functional.normalize(q, dim=-1).abs().sum(-1).double()  # (B, R) L1 norms
    cn = torch.nn.functional.normalize(c, dim=-1).abs().sum(-1).double()  # (B, K, R')
    qs, cs = qs.double(), scales.view(2, 10, 64).double()
    bound = (
        qn[:, None, :, None] * cs[:, :, None, :] + cn[:, :, None, :] * qs[:, None, :, None]
    ) / 2 + 512 * qs[:, None, :, None] * cs[:, :, None, :] / 4
    err = (got.double() - ref).abs()
    assert bool((err <= bound + 1e-6).all())
    assert float(err.mean()) < 1e-3  # typical error, far below the entropic blur eps = 0.05


def test_probe_rows_give_candidate_products():
    q, c = _patches(2, 5, 16), _patches(2, 3, 4, 16, seed=1)
    probe = q.mean(1, keepdim=True)
    sim, probe_cos = patch_cosine(q, c, candidate_norms=c.norm(dim=-1), probes=probe)
    assert_close(sim, patch_cosine(q, c), atol=1e-6, rtol=0)
    direct = torch.nn.functional.cosine_similarity(c, probe[:, :, None, :], dim=-1)
    assert_close(probe_cos[:, :, 0], direct, atol=1e-6, rtol=0)


def test_int8_candidates_need_scales():
    codes, _ = quantize_patches(_patches(3, 4, 8))
    with pytest.raises(ValueError, match="candidate_scales"):
        patch_cosine(_patches(1, 4, 8), codes.view(1, 3, 4, 8))


@pytest.mark.parametrize("weighting", ["apc", "uniform", "sc"])
def test_int8_stage2_agrees_with_float32(weighting):
    g = torch.Generator().manual_seed(3)
    gallery = FeatureBank(
        torch.randn(60, 16, generator=g), _patches(60, 16, 64, seed=4), torch.arange(60)
    )
    noisy = gallery.patches[:12] + 0.3 * torch.randn(12, 16, 64, generator=g)
    query = FeatureBank(gallery.embeddings[:12], noisy.relu(), torch.arange(12))
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 20)
    cfg = RerankConfig(top_k=20, weighting=weighting, tol=1e-6, max_iter=2000)
    ref = stage2_scores(query, gallery, cand, cfg)
    got = stage2_scores(
        query, gallery, cand, RerankConfig(**{**cfg.__dict__, "cost_dtype": "int8"})
    )
    assert_close(got, ref, atol=3e-3, rtol=0)  # a few cosine rounding errors, see above
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_feature_bank_rejects_codes_of_other_patches():
    patches = _patches(5, 4, 8)
    codes, scales = quantize_patches(patches)
    FeatureBank(torch.zeros(5, 2), patches, torch.arange(5), quantized=(codes, scales))
    with pytest.raises(ValueError, match="quantized must be int8 codes"):
        FeatureBank(torch.zeros(5, 2), patches, torch.arange(5), quantized=(codes[:, :2], scales))


def test_bfloat16_product_close_to_float32():
    q, c = _patches(2, 16, 64), _patches(2, 5, 16, 64, seed=1)
    ref = patch_cosine(q, c)
    low = patch_cosine(q, c, torch.bfloat16)
    assert low.dtype == torch.float32
    # bf16 keeps 8 mantissa bits per operand: unit-vector products err by ~1e-2 at most here.
    assert_close(low, ref, atol=2e-2, rtol=0)
    assert float((low - ref).abs().max()) > 0  # the product really ran in bf16
