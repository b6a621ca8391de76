"""Loose Constraint (Dinomaly section 3.4, Fig. 4): layer groups fused into one feature map.

Instead of a layer-to-layer correspondence, the features of several layers are averaged into one
group and the encoder group is matched to the decoder group. Fig. 4(d) is one group of all 8
layers, Fig. 4(e) (the default) two groups ``{0..3}, {4..7}`` and Fig. 4(c) the dense
layer-to-layer baseline, i.e. one group per layer. The official code fuses by *mean* (the paper
text says "adding up"; cosine distances are the same either way).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["fuse_groups", "make_groups", "resolve_groups"]


def make_groups(n_layers: int, n_groups: int) -> list[list[int]]:
    """Split ``range(n_layers)`` into ``n_groups`` contiguous groups (sizes differ by at most 1).

    ``make_groups(8, 1) == [[0..7]]``, ``make_groups(8, 2) == [[0..3], [4..7]]`` and
    ``make_groups(8, 8)`` is dense layer-to-layer ``[[0], [1], ..., [7]]``.
    """
    if not 1 <= n_groups <= n_layers:
        raise ValueError(f"n_groups must be in [1, {n_layers}], got {n_groups}")
    base, extra = divmod(n_layers, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def resolve_groups(spec: int | str | Sequence[Sequence[int]], n_layers: int) -> list[list[int]]:
    """Group lists from a config value: an int (number of groups), ``"dense"``, a digit string,
    or explicit lists of layer positions (validated)."""
    if isinstance(spec, str):
        if spec == "dense":
            return make_groups(n_layers, n_layers)
        if spec.isdigit():
            return make_groups(n_layers, int(spec))
        raise ValueError(f"groups must be an int, 'dense' or a list of lists, got {spec!r}")
    if isinstance(spec, int):
        return make_groups(n_layers, spec)
    groups = [list(map(int, g)) for g in spec]
    flat = [i for g in groups for i in g]
    if not groups or any(not g for g in groups) or any(not 0 <= i < n_layers for i in flat):
        raise ValueError(f"invalid groups {spec!r} for {n_layers} layers")
    return groups


def fuse_groups(features: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Mean of the listed features per group: ``out[g] = mean_{i in groups[g]} features[i]``."""
    out = []
    for g in groups:
        if len(g) == 1:
            out.append(features[g[0]])
        else:
            out.append(torch.stack([features[i] for i in g], dim=0).mean(dim=0))
    return out
