"""Common pieces of the frozen feature extractors: the output record and the frozen module base."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .weights import WeightsInfo


@dataclass
class FeatureOutput:
    """What a :class:`Backbone` returns.

    ViT backbones fill ``tokens`` (one ``(B, N, C)`` tensor per requested block, patch tokens only,
    ``N = h * w`` in row-major order), ``prefix`` (the removed class / register tokens, ``(B, P, C)``),
    ``grid = (h, w)`` and, when built with ``need_attention=True``, ``attn``: one
    ``(B, heads, P + N, P + N)`` softmax attention map per requested block (prefix tokens first);
    with ``attention="prefix"`` only the prefix rows, ``(B, heads, P, P + N)``.
    CNN backbones fill ``maps``: one ``(B, C, h, w)`` tensor per requested stage.
    ``layers`` are the requested indices, in the order of the lists.
    """

    tokens: list[torch.Tensor] | None = None
    prefix: list[torch.Tensor] | None = None
    grid: tuple[int, int] | None = None
    attn: list[torch.Tensor] | None = None
    maps: list[torch.Tensor] | None = None
    layers: tuple[int, ...] = field(default_factory=tuple)

    def token_maps(self) -> list[torch.Tensor]:
        """ViT tokens as spatial maps: ``(B, N, C) -> (B, C, h, w)``."""
        if self.tokens is None or self.grid is None:
            raise ValueError("token_maps() needs ViT tokens and a grid")
        h, w = self.grid
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w) for t in self.tokens]


def normalize_layers(layers: Sequence[int] | int | None, depth: int, what: str, default: Sequence[int]) -> tuple[int, ...]:
    """Validate layer indices against ``depth`` (negative indices count from the end)."""
    if layers is None:
        layers = tuple(default)
    if isinstance(layers, int):
        layers = (layers,)
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                i = int(i)  # numpy ints, OmegaConf values
            except (TypeError, ValueError):
                raise TypeError(f"layer indices must be integers, got {i!r}") from None
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer index {i} is out of range for {what} (valid: 0..{depth - 1} or -{depth}..-1)")
        out.append(j)
    if not out:
        raise ValueError(f"no layers requested for {what}")
    return tuple(out)


class Backbone(nn.Module):
    """A frozen, eval-mode feature extractor (parameters have ``requires_grad=False``).

    Subclasses set ``kind`` ("vit" / "cnn"), ``name`` (timm name), ``layers``, ``patch_size``
    (ViT patch, or the reduction of the first requested CNN stage), ``data_config`` (timm's
    mean / std / input size ...) and ``weights_info``.
    """

    kind: str = "base"

    def __init__(self, name: str, weights_info: WeightsInfo, data_config: dict[str, Any]):
        super().__init__()
        self.name = name
        self.weights_info = weights_info
        self.data_config = dict(data_config)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        """The backbone is frozen: it always stays in eval mode (BatchNorm stats, dropout off)."""
        return super().train(False)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.data_config["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.data_config["std"])

    def tags(self) -> dict[str, str]:
        return {"backbone": self.name, **self.weights_info.as_tags()}

    def list_layers(self) -> list[dict[str, Any]]:  # pragma: no cover - overridden
        raise NotImplementedError
