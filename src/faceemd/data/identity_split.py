"""A fixed split of a data set's people into two halves, for choosing settings on one half
and reporting them on the other (never on the people they were chosen on).

The halves depend only on the set of identity names and a seed: the sorted names are permuted
by ``numpy.random.default_rng(seed)``; the first ``ceil(n / 2)`` are half 0, the rest half 1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["half_positions", "identity_half"]


def identity_half(names, half: int, seed: int = 0) -> set[str]:
    """The identity names of ``half`` (0 or 1) among the distinct ``names``."""
    if half not in (0, 1):
        raise ValueError(f"identity_half must be 0 or 1 (or null), got {half!r}")
    people = sorted(set(names))
    order = np.random.default_rng(seed).permutation(len(people))
    cut = (len(people) + 1) // 2
    chosen = order[:cut] if half == 0 else order[cut:]
    return {people[i] for i in chosen}


def half_positions(faces, half: int, seed: int = 0) -> np.ndarray:
    """``(len(faces),)`` bool: which positions of a face set show a person of ``half``."""
    names = faces.label_names()
    chosen = identity_half(names, half, seed)
    return np.fromiter((n in chosen for n in names), bool, len(names))
