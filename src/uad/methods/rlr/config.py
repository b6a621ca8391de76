"""RLR's settings. Defaults = the paper (Sec. 4.2) where it speaks, the public code
(``hlr7999/RLR``, its README training command) where the paper is silent or disagrees; every such
choice is a row of ``docs/deviations.md``.

Ablations of the paper as parameters:

* Table 3 (attention variants): ``attention`` is a list of token mixers summed in each block,
  each one of ``lca`` (Local Cross Attention, eq. 10-12), ``mlka`` (Masked Learnable Key Attention,
  eq. 7-9), ``cross`` (plain cross attention to the reference: Q from the tokens, K and V from the
  reference, no mask), ``self`` (vanilla self-attention) or ``masked_self`` (self-attention with
  the neighbour mask); ``residual: true`` adds the shortcut around the attention sum. The rows:
  ``[self] + residual``, ``[cross] + residual``, ``[cross]``, ``[mlka]``, ``[lca]``,
  ``[cross, mlka]``, ``[lca, mlka]`` (the method).
* Table 4 (feature levels): ``layers: [1, 2, 3]`` (default) or ``[2, 3]``, ``[1, 2]``.
* Table 5 (alpha): ``alpha``.
* Feature perturbation on / off: ``noise_scale: 0`` switches it off.

Paper readings that differ from the code, selectable:

* ``window_order: paper`` pairs the 5 / 7 / 11 windows with stages 1 / 2 / 3 as Sec. 4.2's sentence
  reads (the code, the default, puts 11 on the largest map);
* ``io_projection: ffn`` uses eq. 6's FFNs in and out (the code: a 1x1 projection in, LayerNorm +
  Linear out);
* ``distance: l2`` uses the per-token L2 norm of eq. 14 / 16 (the code: the per-token mean
  squared error);
* ``pos_embed: false`` drops the code's fixed 2-D sine-cosine position embedding (the paper does
  not mention one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from uad.errors import ConfigError

from ..base import check_param_names, parse_list_params

__all__ = ["ATTENTION_KINDS", "RLRConfig"]

#: token mixers; the value says which sources feed (query, key, value) and which mask applies
ATTENTION_KINDS = ("lca", "mlka", "cross", "self", "masked_self")


@dataclass
class RLRConfig:
    """All RLR parameters; unknown keys in :meth:`from_params` raise a ValueError."""

    # encoder: frozen ImageNet EfficientNet-B6 (AutoAugment weights), stages 1-3 (timm out indices)
    backbone: str = "tf_efficientnet_b6.aa_in1k"
    weights: str = "auto"
    allow_random: bool = False
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    resize: int = 256
    crop: int = 256  # the paper resizes to 256 x 256 and does not crop
    neighbourhood: int = 3  # eq. 1-2: p x p average pooling, stride 1, zero padding counted (0/1: off)
    # reconstructor, one per level
    hidden_dims: list[int] | None = None  # None: 128 * 2 ** (stage - 1) as the code (128 / 256 / 512)
    windows: list[int] | None = None  # None: from the stage's stride (window_order)
    window_order: str = "code"  # code: stride 4 -> 11, 8 -> 7, 16 -> 5; paper: 4 -> 5, 8 -> 7, 16 -> 11
    depth: int = 4  # blocks per level (K)
    num_heads: int = 8
    mlp_ratio: float = 4.0
    alpha: float = 2.0  # weight of the reference-valued attention (LCA / cross) in eq. 4
    attention: list[str] = field(default_factory=lambda: ["lca", "mlka"])
    residual: bool = False  # Table 3's "Residual" column: shortcut around the attention sum
    io_projection: str = "code"  # code | ffn (eq. 6)
    pos_embed: bool = True
    reference_std: float = 1.0  # the learnable reference starts as N(0, reference_std^2)
    # feature perturbation (eq. 3): per token N(0, 1) * noise_scale * ||f||_2 / C on noise_prob of tokens
    noise_scale: float = 4.0
    noise_prob: float = 1.0
    # loss (eq. 13-14) and map (eq. 15-16)
    distance: str = "mse"  # mse (code) | l2 (paper)
    map_sigma: float = 0.0  # the pixel map is not smoothed (code)
    score_sigma: float = 4.0  # image score = max of the sigma-4 smoothed map (scipy's gaussian_filter)
    # optimisation: Adam, constant lr, 200 epochs
    # summed: one Adam step on the sum of the levels' losses (eq. 14's total). per_level: the
    # released loop, one zero_grad + backward + step per level with one shared Adam, as it ran on
    # torch < 2.0 (zero-filled gradients: every level moves at every level's step); its numbers
    # came from that
    optimizer_steps: str = "summed"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    epochs: int = 200
    iterations: int | None = None  # None: ceil(epochs * n_train / batch_size)
    batch_size: int = 4  # the README's training command
    seed: int = 3407  # the code's seed; used for the reconstructors' initialisation

    method_label: ClassVar[str] = "rlr"

    def __post_init__(self) -> None:
        self.layers = [int(i) for i in self.layers]
        self.attention = [str(a) for a in self.attention]
        if not self.layers:
            raise ConfigError("rlr: 'layers' must name at least one feature stage")
        bad = [a for a in self.attention if a not in ATTENTION_KINDS]
        if bad or not self.attention:
            raise ConfigError(f"rlr: attention must be a non-empty list of {ATTENTION_KINDS}, got {self.attention}")
        if len(set(self.attention)) != len(self.attention):
            raise ConfigError(f"rlr: attention lists a mixer twice: {self.attention}")
        if self.window_order not in ("code", "paper"):
            raise ConfigError(f"rlr: window_order must be 'code' or 'paper', got {self.window_order!r}")
        if self.io_projection not in ("code", "ffn"):
            raise ConfigError(f"rlr: io_projection must be 'code' or 'ffn', got {self.io_projection!r}")
        if self.optimizer_steps not in ("summed", "per_level"):
            raise ConfigError(f"rlr: optimizer_steps must be 'summed' or 'per_level', got {self.optimizer_steps!r}")
        if self.distance not in ("mse", "l2"):
            raise ConfigError(f"rlr: distance must be 'mse' or 'l2', got {self.distance!r}")
        for name in ("hidden_dims", "windows"):
            val = getattr(self, name)
            if val is not None:
                val = [int(v) for v in val]
                setattr(self, name, val)
                if len(val) != len(self.layers):
                    raise ConfigError(f"rlr: {name} has {len(val)} entries for {len(self.layers)} layers")
        if self.windows is not None and any(w < 1 or w % 2 == 0 for w in self.windows):
            raise ConfigError(f"rlr: windows must be odd and positive, got {self.windows}")
        if self.neighbourhood > 1 and self.neighbourhood % 2 == 0:
            raise ConfigError(f"rlr: neighbourhood must be odd (stride-1 pooling keeps the map size), got {self.neighbourhood}")
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ConfigError(f"rlr: noise_prob must be in [0, 1], got {self.noise_prob}")
        if self.crop > self.resize:
            raise ConfigError(f"rlr: crop ({self.crop}) cannot exceed resize ({self.resize})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("rlr: epochs and batch_size must be positive")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> "RLRConfig":
        params = dict(params or {})
        check_param_names(cls, params, "rlr")
        parse_list_params(params, ("layers", "attention", "hidden_dims", "windows"))
        return cls(**params)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- derived per-level settings -------------------------------------------------------------
    def hidden_dim(self, position: int, stage: int) -> int:
        """Hidden width of level ``position`` (stage ``stage``): the code's ``128 * 2 ** (stage - 1)``."""
        if self.hidden_dims is not None:
            return self.hidden_dims[position]
        return int(128 * 2 ** (stage - 1))

    def window(self, position: int, stride: int) -> int:
        """Neighbour window of level ``position`` whose map has stride ``stride`` to the image.

        The code picks the window by map side at 256 px (64 -> 11, 32 -> 7, 16 -> 5); here the same
        pairing is keyed by the stride (4 -> 11, 8 -> 7, 16 -> 5), so other input sizes keep it.
        ``window_order: paper`` reverses it (Sec. 4.2's sentence)."""
        if self.windows is not None:
            return self.windows[position]
        table = {4: 11, 8: 7, 16: 5} if self.window_order == "code" else {4: 5, 8: 7, 16: 11}
        if stride not in table:
            raise ConfigError(f"rlr: no default window for a feature stride of {stride}; set 'windows' explicitly")
        return table[stride]

    def mixer_weight(self, kind: str) -> float:
        """Weight of a token mixer in the attention sum: ``alpha`` for the reference-valued ones."""
        return float(self.alpha) if kind in ("lca", "cross") else 1.0
