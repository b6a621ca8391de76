"""The matching-cost volume of CostFilter-AD (sec. 3.2, eq. 1-2) and the guidance map.

Per layer ``l``, every query position ``i`` is compared with every template position ``j``::

    C_l[i, j] = 1 - <q_i / (|q_i| + eps), t_j / (|t_j| + eps)>          (eq. 1)
    M_l[i]    = min_j C_l[i, j]                                        (eq. 2, the initial map)

The matching axis keeps the ``D`` smallest costs of each row, **in template order** (the official
``gather(cost, sort(topk(cost, D, largest=False).indices))``): with ``D`` = the number of template
positions nothing is dropped and channel ``j`` is template position ``j``. Rows are reshaped to the
query grid and bilinearly resized (``align_corners=True``) to ``volume_size``; the layers stack on a
depth axis, giving the (B, D, L, S, S) volume the 3D filter reads. (The filter applies the resize
after its first 1x1x1 convolution: the two linear maps commute, and the D-channel volume then stays
at the token grid, 5x smaller for Dinomaly's 28 -> 64.)

All of it is batched matrix products, one ``topk`` and one ``gather`` per layer: no loop over
positions or samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["cost_matrix", "select_matching", "build_volume", "aligned_distance_map", "resize_maps"]


def cost_matrix(query: torch.Tensor, template: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 1: ``1 - cos`` between every query token and every template token.

    ``query`` (B, n, C), ``template`` (B, m, C) -> (B, n, m) float32."""
    q = query.float()
    t = template.float()
    q = q / (q.norm(dim=-1, keepdim=True) + eps)
    t = t / (t.norm(dim=-1, keepdim=True) + eps)
    return 1.0 - torch.bmm(q, t.transpose(1, 2))


def select_matching(cost: torch.Tensor, d: int) -> torch.Tensor:
    """The ``d`` smallest costs of each row, kept in template (column) order: (B, n, m) -> (B, n, d)."""
    m = cost.shape[-1]
    if d >= m:
        return cost
    idx = cost.topk(d, dim=-1, largest=False, sorted=False).indices
    return cost.gather(-1, idx.sort(dim=-1).values)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, size, size), bilinear with ``align_corners=True`` (the official
    ``UpsamplingBilinear2d``)."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)


def build_volume(queries: Sequence[torch.Tensor], templates: Sequence[torch.Tensor], grid: tuple[int, int],
                 matching_channels: int | None, size: int | None = None, eps: float = 1e-8
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The filter's input volume and the per-layer initial maps.

    ``queries[l]`` (B, h*w, C_l) on ``grid``; ``templates[l]`` (B, m, C_l) (N templates concatenated
    on the token axis). Returns ``volume`` (B, D, L, size, size) and ``initial`` (B, L, h, w), with
    ``D = matching_channels`` (None: all ``m``). ``size=None`` keeps the volume on the query grid,
    (B, D, L, h, w): the filter resizes it after its first (1x1x1, linear) convolution, which
    commutes with the bilinear resize, so the full-size D-channel volume is never materialised."""
    h, w = grid
    vols, initial = [], []
    for q, t in zip(queries, templates):
        cost = cost_matrix(q, t, eps)  # B, n, m
        initial.append(cost.min(dim=-1).values)
        d = cost.shape[-1] if matching_channels is None else int(matching_channels)
        vols.append(select_matching(cost, d))  # B, n, D
    vol = torch.stack(vols, dim=1)  # B, L, n, D
    b, n_layers, n, d = vol.shape
    if n != h * w:
        raise ValueError(f"costfilter: {n} query tokens do not fill the {h}x{w} grid")
    vol = vol.transpose(2, 3).reshape(b * n_layers, d, h, w)
    if size is not None:
        vol = resize_maps(vol, size)
        h, w = size, size
    vol = vol.reshape(b, n_layers, d, h, w).transpose(1, 2)  # B, D, L, S, S
    return vol.contiguous(), torch.stack(initial, dim=1).reshape(b, n_layers, *grid)


def aligned_distance_map(queries: Sequence[torch.Tensor], templates: Sequence[torch.Tensor],
                         grid: tuple[int, int]) -> torch.Tensor:
    """A reconstruction base's own map at its grid: the mean over layers of the position-wise
    ``1 - cos(input_i, reconstruction_i)`` (Dinomaly / INP-Former's ``cal_anomaly_maps`` before
    any resize). (B, h, w) float32."""
    maps = [1.0 - F.cosine_similarity(q.float(), t.float(), dim=-1) for q, t in zip(queries, templates)]
    return torch.stack(maps, dim=1).mean(dim=1).reshape(-1, *grid)
