"""The ground cost of patch-wise EMD: cosine similarity between patch embeddings (paper Eq. 5).

Stage 2 compares each query with its ``K`` candidates patch by patch, so the similarity matrix
``(B, K, R, R')`` is the one large matrix product of re-ranking (``K * R * R' * C``
multiply-adds per query). It is computed here in one of three precisions:

- float32 (default) or bfloat16 operands for the product (``dtype``), on any device;
- int8 codes (``torch.int8`` candidates from :func:`quantize_patches`): each L2-normalised
  patch is stored once per gallery as ``round(x / s)`` with a per-patch scale ``s = max|x| / 127``,
  and the product runs on the CPU's integer dot-product units (``torch._int_mm``; measured
  750-960 GOP/s on the stage-2 shapes against 272-301 GFLOP/s for float32 on AVX-512 VNNI,
  README performance section).
  Rounding moves a cosine by at most ``(|x|_1 s_y + |y|_1 s_x) / 2 + C s_x s_y / 4``; on
  post-ReLU features with C = 512 that is 3.5e-4 on average and 2e-3 at most
  (``tests/test_emd_cost.py``), far under the entropic blur ``eps = 0.05``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COST_DTYPES", "patch_cosine", "quantize_patches"]

# Float precisions of the patch-cosine product (``cost_dtype``; ``int8`` uses codes instead).
COST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_INT8_MAX = 127.0


def quantize_patches(patches: Tensor, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """int8 codes of the L2-normalised patches and their scales, for int8 stage-2 products.

    patches: ``(N, R, C)`` any float dtype (may be memory-mapped; read ~4 MB at a time).
    Returns ``codes (N, R, C) int8`` and ``scales (N, R) float32`` with
    ``patches[n, r] / ||patches[n, r]|| ~= codes[n, r] * scales[n, r]``. All-zero patches get
    zero codes (their cosine with anything is 0, as in :func:`patch_cosine`).
    """
    n, r, c = patches.shape
    rows = chunk_rows or max(1, (1 << 20) // max(1, r * c))
    codes = torch.empty(n, r, c, dtype=torch.int8, device=patches.device)
    scales = torch.empty(n, r, device=patches.device)
    for i in range(0, n, rows):
        x = torch.nn.functional.normalize(patches[i : i + rows].float(), dim=-1)
        s = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12).div_(_INT8_MAX)
        codes[i : i + rows] = x.div_(s).round_()
        scales[i : i + rows] = s.squeeze(-1)
    return codes, scales


def patch_cosine(
    query: Tensor,
    candidates: Tensor,
    dtype: torch.dtype | None = None,
    candidate_norms: Tensor | None = None,
    candidate_scales: Tensor | None = None,
    probes: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cosine similarity between every query patch and every candidate patch (Eq. 5).

    query: ``(B, R, C)``; candidates: ``(B, K, R', C)``. Returns ``sim (B, K, R, R')`` float32,
    contiguous; with ``probes (B, P, C)`` (extra query-side vectors such as the mean patch, whose
    cosines with every candidate patch the APC/CC weights need) also ``(B, K, P, R')``: they
    ride along as extra rows of the same product instead of a second pass over the candidates.

    - float candidates: ``dtype`` (e.g. ``torch.bfloat16``) is the precision of the product
      only; normalisation is float32. ``candidate_norms`` ``(B, K, R')``, the precomputed patch
      norms, let the product use the candidates as they are and divide afterwards, sparing a
      normalisation pass over ``(B, K, R', C)``.
    - int8 candidates (codes from :func:`quantize_patches`) need ``candidate_scales``
      ``(B, K, R')``; the query rows are quantised the same way.
    """
    b, k, r2, c = candidates.shape
    r = query.shape[1]
    rows = query if probes is None else torch.cat([query.float(), probes.float()], 1)
    m = rows.shape[1]
    if candidates.dtype == torch.int8:
        if candidate_scales is None:
            raise ValueError("int8 candidates need their candidate_scales (see quantize_patches)")
        row_codes, row_scale = quantize_patches(rows)
        flat = _int8_products(row_codes, candidates)  # (B, M, K*R') integer-valued
        per_query = flat.view(b, m, k, r2).transpose(1, 2)
        col_scale = candidate_scales.float()
    else:
        q = torch.nn.functional.normalize(rows.float(), dim=-1)
        g = (
            candidates
            if candidate_norms is not None
            else torch.nn.functional.normalize(candidates.float(), dim=-1)
        )
        dtype = dtype or torch.float32
        q, g = q.to(dtype), g.to(dtype)
        row_scale = None
        col_scale = None
        if candidate_norms is not None:
            col_scale = candidate_norms.float().clamp_min(1e-12).reciprocal()
        per_query = _float_products(q, g)
    # (B, K, M, R') -> contiguous float32 (B, K, R, R') (+ probes), scales applied in place.
    sim = _rescaled(per_query[:, :, :r], row_scale, col_scale, 0)
    if probes is None:
        return sim
    return sim, _rescaled(per_query[:, :, r:], row_scale, col_scale, r)


def _rescaled(x: Tensor, row: Tensor | None, col: Tensor | None, first_row: int) -> Tensor:
    """Contiguous float32 copy of ``x (B, K, M', R')`` times ``row[:, first_row:][.., None]``
    ``(B, M)`` and ``col (B, K, R')`` where given (copy, then in-place products: converting
    and multiplying in one op is several times slower on CPU)."""
    out = torch.empty(x.shape, device=x.device)
    out.copy_(x)
    if row is not None:
        out.mul_(row[:, None, first_row : first_row + x.shape[2], None])
    if col is not None:
        out.mul_(col.unsqueeze(2))
    return out


# Query-side rows are padded to a multiple of this: BLAS kernels for a skinny product run up to
# twice as fast with the small dimension a multiple of the SIMD width (measured: 43 -> 48 rows).
_ROW_ALIGN = 16


def _float_products(rows: Tensor, candidates: Tensor) -> Tensor:
    """Dot products of query rows ``(B, M, C)`` with candidate patches ``(B, K, R', C)`` as a
    ``(B, K, M, R')`` view. Computed as candidates ``(K*R', C)`` x rows ``(C, M')`` per query,
    the rows zero-padded to ``M'``, a multiple of :data:`_ROW_ALIGN`: with the long dimension
    on the left and an aligned short one, a CPU BLAS runs this skinny product near its peak,
    where ``(M, C) x (C, K*R')`` ran at half of it (README, performance)."""
    b, k, r2, c = candidates.shape
    m = rows.shape[1]
    pad = -m % _ROW_ALIGN
    if pad:
        rows = torch.cat([rows, rows.new_zeros(b, pad, c)], 1)
    flat = torch.bmm(candidates.reshape(b, k * r2, c), rows.transpose(1, 2))  # (B, K*R', M')
    return flat.view(b, k, r2, m + pad)[..., :m].transpose(2, 3)


def _int8_products(row_codes: Tensor, codes: Tensor) -> Tensor:
    """Integer products of int8 row codes ``(B, M, C)`` with codes ``(B, K, R', C)``:
    ``(B, M, K*R')``, int32 on the CPU (VNNI), exact float32 elsewhere."""
    b, k, r2, c = codes.shape
    if codes.device.type != "cpu":
        # Products of int8 codes are summed exactly in float32 (|sum| <= C * 127^2 < 2^24 for
        # C <= 1040), all queries in one batched product.
        cols = codes.reshape(b, k * r2, c).float().transpose(1, 2)
        return torch.bmm(row_codes.float(), cols)
    out = torch.empty(b, row_codes.shape[1], k * r2, dtype=torch.int32)
    for i in range(b):
        # int32 accumulation on the integer units; operands (M, C) and (C, N).
        torch._int_mm(row_codes[i], codes[i].reshape(k * r2, c).T, out=out[i])
    return out
