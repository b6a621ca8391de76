"""CostFilter-AD's filtering network (sec. 3.3, Fig. 2): a 3D U-Net over the cost volume.

Input: the volume (B, D, L, S, S) (matching channels x layers x space), the input's features
(the *spatial guidance* SG, per guided level one (B, h*w, C) token tensor) and the guidance map
(the *matching guidance* MG, (B, L, S, S)). The depth axis (the L layers) is never pooled.

Encoder (bw = ``base_width``, 48 in the paper's code)::

    squeeze   1x1x1 conv D -> s0*bw -> s1*bw (BN, ReLU each)          [s = (4, 2)]
    level 1   block(2bw -> bw)            + RCSA(SG, MG)     S
    level 2   pool, block(bw -> 2bw)                          S/2
    level 3   pool, block(2bw -> 2bw)     + RCSA(SG, MG)     S/4
    level 4   pool, block(2bw -> 4bw)     + RCSA(SG, MG)     S/8
    level 5   pool, block(4bw -> 6bw)                          S/16
    level 6   block(6bw -> 8bw)           + RCSA(SG, MG)     S/16

``block`` = two (3x3x3 conv, BN, ReLU); pools are (1, 2, 2) max pools. RCSA (residual channel-spatial
attention, eq. 3-4): ``x' = [x, h(SG), h(MG)]``, ``x' = x' + x' * sigmoid(MLP(avg) + MLP(max))``,
``x' = x' + x' * sigmoid(conv7([mean_c, max_c]))``, then a 1x1x1 conv back to the level's width;
``h`` is the guidance projector (1x1x1 conv to the width, trilinear resize to the level's
(L, H, W), 3x3x3 conv). Guided level ``k`` of 4 reads SG tensor ``floor(k * G / 4)`` of ``G``.

Decoder: up-sample x2 in H, W (trilinear, ``align_corners=True``) + conv, concatenate the skip,
blocks (levels 4 and 2 with a CBAM of reduction 8 and a 3x3x3 spatial kernel); the last block
halves its width. Head: a (L, 1, 1) conv folds the depth, a residual channel attention, the **min
over the filtered channels** and a 1x1 conv give 2 logits per pixel: ``softmax(conv(min(x)))``
(sec. 3.4). Class-aware adaptor: the finest decoder features (3bw channels) -> channel attention ->
3x3x3 conv -> ReLU -> global average -> linear class logits.

Initialisation: Kaiming-normal (fan_out, ReLU) for every conv, zero biases, BN (1, 0).
:func:`convert_official_state_dict` maps the released ``DiscriminativeSubNetwork_3d_att_dino_channel``
weights onto this module (its unused ``conv2`` is dropped).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CostFilterNet", "convert_official_state_dict", "init_filter_weights"]


def _cbr(cin: int, cout: int, k: int | tuple[int, int, int] = 3) -> nn.Sequential:
    """Conv3d + BN + ReLU; ``k`` 3 pads 1, ``k`` 1 pads 0."""
    pad = 1 if k == 3 else 0
    return nn.Sequential(nn.Conv3d(cin, cout, k, padding=pad), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class ChannelGate(nn.Module):
    """Residual channel attention: ``x + x * sigmoid(MLP(avg) + MLP(max))``, MLP = two bias-free
    1x1x1 convs with a ReLU (shared for both poolings: run once on the stacked pair)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv3d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv3d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.flatten(2)
        pooled = torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=0)  # 2B, C
        hidden = F.relu(F.linear(pooled, self.fc1.weight.flatten(1)))
        logits = F.linear(hidden, self.fc2.weight.flatten(1))
        gate = torch.sigmoid(logits[:b] + logits[b:]).reshape(b, c, 1, 1, 1)
        return x + x * gate


class SpatialGate(nn.Module):
    """Residual spatial attention: ``x + x * sigmoid(conv_k([mean_c x, max_c x]))``."""

    def __init__(self, kernel: int):
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x + x * torch.sigmoid(self.conv(desc))


class CBAM(nn.Sequential):
    def __init__(self, channels: int, reduction: int = 8, kernel: int = 3):
        super().__init__(ChannelGate(channels, reduction), SpatialGate(kernel))


class Block(nn.Sequential):
    """Two (3x3x3 conv, BN, ReLU); ``mid`` is the first conv's width (default ``cout``);
    ``attention`` appends a CBAM."""

    def __init__(self, cin: int, cout: int, mid: int | None = None, attention: bool = False):
        mid = cout if mid is None else mid
        layers = [*_cbr(cin, mid), *_cbr(mid, cout)]
        if attention:
            layers.append(CBAM(cout))
        super().__init__(*layers)


class Up(nn.Module):
    """x2 in H and W (trilinear, corners aligned), then conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _cbr(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=True))


class GuidanceProjector(nn.Module):
    """``h``: (B, C_in, 1, h, w) -> 1x1x1 conv/BN/ReLU -> trilinear resize to the level's
    (L, H, W) -> 3x3x3 conv/BN/ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = _cbr(cin, cout, 1)
        self.refine = _cbr(cout, cout)

    def forward(self, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        x = F.interpolate(self.proj(x), size=size, mode="trilinear", align_corners=False)
        return self.refine(x)


class RCSA(nn.Module):
    """Residual channel-spatial attention fusion of a level with its two guidance streams."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        self.channel = ChannelGate(3 * channels, reduction)
        self.spatial = SpatialGate(kernel)
        self.out = nn.Sequential(nn.Conv3d(3 * channels, channels, 1), nn.BatchNorm3d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, feat: torch.Tensor, gmap: torch.Tensor) -> torch.Tensor:
        return self.out(self.spatial(self.channel(torch.cat([x, feat, gmap], dim=1))))


#: encoder levels (0-based) that fuse guidance, and their widths in units of base_width
_GUIDED = (0, 2, 3, 5)
_ENC_WIDTHS = (1, 2, 2, 4, 6, 8)


class CostFilterNet(nn.Module):
    """The 3D U-Net filter with dual-stream guidance and the class-aware adaptor.

    Args:
        matching_channels: D, the volume's channels.
        depth: L, the layers on the depth axis.
        feature_dims: widths of the SG token tensors (one per given guidance tensor, 1 to 4).
        num_classes: outputs of the adaptor (the training classes).
        base_width: bw (48).
        squeeze: widths of the two 1x1x1 input convs in units of bw ((4, 2); GLAD's code (8, 2)).
    """

    def __init__(self, matching_channels: int, depth: int, feature_dims: Sequence[int], num_classes: int,
                 base_width: int = 48, squeeze: Sequence[int] = (4, 2)):
        super().__init__()
        bw = int(base_width)
        self.depth = int(depth)
        self.num_guidance = len(feature_dims)
        if not 1 <= self.num_guidance <= 4:
            raise ValueError(f"costfilter: 1 to 4 guidance feature tensors, got {self.num_guidance}")
        s0, s1 = (int(s) * bw for s in squeeze)
        self.squeeze = nn.Sequential(_cbr(matching_channels, s0, 1), _cbr(s0, s1, 1))
        cins = (s1,) + tuple(w * bw for w in _ENC_WIDTHS[:-1])
        self.blocks = nn.ModuleList(Block(ci, w * bw) for ci, w in zip(cins, _ENC_WIDTHS))
        widths = [_ENC_WIDTHS[k] * bw for k in _GUIDED]
        self.sources = [min(self.num_guidance - 1, (k * self.num_guidance) // 4) for k in range(4)]
        self.feature_proj = nn.ModuleList(GuidanceProjector(int(feature_dims[s]), c) for s, c in zip(self.sources, widths))
        self.map_proj = nn.ModuleList(GuidanceProjector(self.depth, c) for c in widths)
        self.fusion = nn.ModuleList(RCSA(c) for c in widths)
        # decoder
        self.bottom = Block(14 * bw, 8 * bw)
        self.ups = nn.ModuleList([Up(8 * bw, 4 * bw), Up(4 * bw, 2 * bw), Up(2 * bw, bw), Up(bw, bw)])
        self.dec = nn.ModuleList([
            Block(8 * bw, 4 * bw, attention=True),
            Block(4 * bw, 2 * bw),
            Block(3 * bw, bw, attention=True),
            Block(2 * bw, bw, mid=2 * bw, attention=True),
        ])
        self.head_fold = nn.Conv3d(bw, bw, (self.depth, 1, 1))
        self.head_gate = ChannelGate(bw, 4)
        self.head_out = nn.Conv2d(1, 2, 1)
        self.cls_gate = ChannelGate(3 * bw, 16)
        self.cls_conv = nn.Conv3d(3 * bw, bw, 3, padding=1)
        self.cls_fc = nn.Linear(bw, int(num_classes))
        init_filter_weights(self)

    def squeeze_volume(self, volume: torch.Tensor, size: int) -> torch.Tensor:
        """The two 1x1x1 input convolutions; a volume still on the token grid is resized to
        ``size`` (trilinear with the depth kept = bilinear per layer, corners aligned) right after
        the first convolution, before its BN (conv and resize are both linear: they commute)."""
        conv, bn, relu = self.squeeze[0]
        x = conv(volume)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(x.shape[2], size, size), mode="trilinear", align_corners=True)
        return self.squeeze[1](relu(bn(x)))

    def forward(self, volume: torch.Tensor, features: Sequence[torch.Tensor], gmap: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``volume`` (B, D, L, S, S) or (B, D, L, h, w) on ``grid``, ``features`` G x (B, h*w, C_g)
        on ``grid``, ``gmap`` (B, L, S, S) -> (logits (B, 2, S, S), class logits (B, K))."""
        if len(features) != self.num_guidance:
            raise ValueError(f"costfilter: {len(features)} guidance tensors, the filter was built for {self.num_guidance}")
        h, w = grid
        feats = [f.transpose(1, 2).reshape(f.shape[0], f.shape[2], 1, h, w) for f in features]  # B, C, 1, h, w
        gm = gmap.unsqueeze(2)  # B, L, 1, S, S: the layers' maps are channels here
        x = self.squeeze_volume(volume, int(gmap.shape[-1]))
        skips = []
        guided = 0
        for k, block in enumerate(self.blocks):
            if 1 <= k <= 4:
                x = F.max_pool3d(x, (1, 2, 2))
            x = block(x)
            if k in _GUIDED:
                size = tuple(x.shape[2:])
                x = self.fusion[guided](x, self.feature_proj[guided](feats[self.sources[guided]], size),
                                        self.map_proj[guided](gm, size))
                guided += 1
            skips.append(x)
        b1, b2, b3, b4, b5, b6 = skips
        y = self.bottom(torch.cat([b6, b5], dim=1))
        for up, dec, skip in zip(self.ups, self.dec, (b4, b3, b2, b1)):
            cat = torch.cat([up(y), skip], dim=1)
            y = dec(cat)
        fine = self.head_gate(self.head_fold(y))  # B, bw, 1, S, S
        logits = self.head_out(fine.amin(dim=1))  # min over the filtered channels -> B, 1, S, S -> B, 2, S, S
        adapt = self.cls_gate(torch.cat([cat, y], dim=1))
        cls = self.cls_fc(F.relu(self.cls_conv(adapt)).mean(dim=(2, 3, 4)))
        return logits, cls


def init_filter_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias, BN weight 1 / bias 0 (the official
    ``weights_init``); Linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# The released weights' names -> ours
# ---------------------------------------------------------------------------------------------
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _cbr_keys(ours: str, conv: str, bn: str, start: int = 0) -> dict[str, str]:
    """A conv at ``ours.<start>`` and its BN at ``ours.<start + 1>``."""
    out = {f"{ours}.{start}.{p}": f"{conv}.{p}" for p in ("weight", "bias")}
    out.update({f"{ours}.{start + 1}.{p}": f"{bn}.{p}" for p in _BN})
    return out


def _gate_keys(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.fc1.weight": f"{theirs}.fc1.weight", f"{ours}.fc2.weight": f"{theirs}.fc2.weight"}


def _block_keys(ours: str, theirs: str, attention: bool) -> dict[str, str]:
    out = {**_cbr_keys(ours, f"{theirs}.conv1", f"{theirs}.bn1"), **_cbr_keys(ours, f"{theirs}.conv2", f"{theirs}.bn2", start=3)}
    if attention:
        out.update(_gate_keys(f"{ours}.6.0", f"{theirs}.cbam.channel_attention"))
        out[f"{ours}.6.1.conv.weight"] = f"{theirs}.cbam.spatial_attention.conv.weight"
    return out


def official_key_map() -> dict[str, str]:
    """Our state-dict key -> the official ``DiscriminativeSubNetwork_3d_att_dino_channel`` key."""
    enc, dec = "encoder_segment", "decoder_segment"
    keys: dict[str, str] = {}
    keys.update(_cbr_keys("squeeze.0", f"{enc}.down_channel1.conv", f"{enc}.down_channel1.bn"))
    keys.update(_cbr_keys("squeeze.1", f"{enc}.down_channel2.conv", f"{enc}.down_channel2.bn"))
    for k in range(6):
        keys.update(_block_keys(f"blocks.{k}", f"{enc}.block{k + 1}", attention=False))
    for i, level in enumerate((1, 3, 4, 6)):
        for ours, theirs in ((f"feature_proj.{i}", f"{enc}.dino_proc{level}"), (f"map_proj.{i}", f"{enc}.min_sim_proc{level}")):
            keys.update(_cbr_keys(f"{ours}.proj", f"{theirs}.conv3d", f"{theirs}.bn"))
            keys.update(_cbr_keys(f"{ours}.refine", f"{theirs}.depth_conv", f"{theirs}.bn2"))
        fus = f"{enc}.cbam_fusion{level}"
        keys.update(_gate_keys(f"fusion.{i}.channel", f"{fus}.channel_attention"))
        keys[f"fusion.{i}.spatial.conv.weight"] = f"{fus}.spatial_attention.conv.weight"
        keys.update(_cbr_keys(f"fusion.{i}.out", f"{fus}.conv1x1", f"{fus}.bn1"))
    keys.update(_block_keys("bottom", f"{dec}.db_b", attention=False))
    for i in range(4):
        keys.update(_cbr_keys(f"ups.{i}.conv", f"{dec}.up{i + 1}.conv", f"{dec}.up{i + 1}.bn"))
    for i, att in enumerate((True, False, True, True)):
        keys.update(_block_keys(f"dec.{i}", f"{dec}.db{i + 1}", attention=att))
    keys.update({f"head_fold.{p}": f"{dec}.conv1.{p}" for p in ("weight", "bias")})
    keys.update(_gate_keys("head_gate", f"{dec}.channel_attention_seg"))
    keys.update({f"head_out.{p}": f"{dec}.conv2d_1to2.{p}" for p in ("weight", "bias")})
    keys.update(_gate_keys("cls_gate", f"{dec}.channel_attention_cls"))
    keys.update({f"cls_conv.{p}": f"{dec}.classifier.0.{p}" for p in ("weight", "bias")})
    keys.update({f"cls_fc.{p}": f"{dec}.classifier.4.{p}" for p in ("weight", "bias")})
    return keys


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official filter's state dict (``checkpoint['model_state_dict']``) in our names.
    Raises ``KeyError`` naming what is missing; the official unused ``conv2`` is dropped."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mapping = official_key_map()
    missing = sorted(v for v in mapping.values() if v not in state)
    if missing:
        raise KeyError(f"costfilter: not an official filter state dict; missing {missing[:5]} (+{max(0, len(missing) - 5)})")
    return {ours: state[theirs] for ours, theirs in mapping.items()}
