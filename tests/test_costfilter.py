"""CostFilter-AD: cost volume, filter shapes, losses, presets, the plug-in contract, GLAD synthesis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uad.errors import ConfigError
from uad.methods.base import Prediction
from uad.methods.common.optim import EpochPlateau
from uad.methods.costfilter import (
    BaseView,
    CostFilterConfig,
    CostFilterNet,
    build_volume,
    convert_official_state_dict,
    cost_matrix,
    costfilter_loss,
    focal_gamma,
    focal_loss,
    select_matching,
    soft_iou_loss,
    ssim_loss,
)
from uad.methods.costfilter.network import RCSA, ChannelGate, SpatialGate, official_key_map
from uad.methods.registry import build_method
from uad.synthesis import GLAD_FOREGROUND, RECIPES, PseudoAnomalySynthesizer, SynthesisConfig, grid_shuffle, otsu_foreground
from uad.synthesis.textures import ProceduralTextureSource

DINO_SMOKE = {"backbone": "dinov2_vits14_reg", "weights": "random", "allow_random": True, "resize": 64, "crop": 56}


# ------------------------------------------------------------------------------------ cost volume
def _direct_cost(q, t, eps=1e-8):
    """Eq. 1 element by element (the reference the batched code must equal)."""
    b, n, _ = q.shape
    m = t.shape[1]
    out = torch.empty(b, n, m)
    for i in range(b):
        for a in range(n):
            qa = q[i, a] / (q[i, a].norm() + eps)
            for c in range(m):
                tc = t[i, c] / (t[i, c].norm() + eps)
                out[i, a, c] = 1.0 - float(qa @ tc)
    return out


def test_cost_matrix_equals_the_direct_formula():
    torch.manual_seed(0)
    q, t = torch.randn(2, 6, 5), torch.randn(2, 9, 5)
    torch.testing.assert_close(cost_matrix(q, t), _direct_cost(q, t), atol=1e-6, rtol=0)


def test_top_d_keeps_the_smallest_costs_in_template_order():
    torch.manual_seed(1)
    cost = torch.rand(2, 4, 10)
    kept = select_matching(cost, 3)
    for b in range(2):
        for i in range(4):
            row = cost[b, i]
            idx = sorted(torch.argsort(row)[:3].tolist())  # the 3 smallest, then by template position
            torch.testing.assert_close(kept[b, i], row[idx])
    assert select_matching(cost, 10) is cost  # D = all: nothing dropped, channel j = template j


def test_volume_layout_and_initial_map():
    torch.manual_seed(2)
    grid = (3, 4)
    qs = [torch.randn(2, 12, 8), torch.randn(2, 12, 16)]
    ts = [torch.randn(2, 20, 8), torch.randn(2, 20, 16)]
    vol, initial = build_volume(qs, ts, grid, 5, None)
    assert vol.shape == (2, 5, 2, 3, 4) and initial.shape == (2, 2, 3, 4)
    for layer in range(2):
        cost = _direct_cost(qs[layer], ts[layer])
        torch.testing.assert_close(initial[:, layer].reshape(2, 12), cost.min(dim=-1).values, atol=1e-6, rtol=0)
        kept = select_matching(cost, 5)  # B, n, D
        torch.testing.assert_close(vol[:, :, layer].reshape(2, 5, 12), kept.transpose(1, 2), atol=1e-6, rtol=0)
    up, _ = build_volume(qs, ts, grid, 5, 8)
    ref = F.interpolate(vol[:, :, 1], size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(up[:, :, 1], ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ filter network
def test_filter_shape_flow_and_guidance_sources():
    torch.manual_seed(0)
    net = CostFilterNet(matching_channels=20, depth=3, feature_dims=[7, 9], num_classes=4, base_width=8)
    assert net.sources == [0, 0, 1, 1]  # Dinomaly's two groups: levels 1, 3 <- g0; 4, 6 <- g1
    seen = {}
    for k, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, tuple(o.shape)))
    vol, gmap = torch.randn(2, 20, 3, 32, 32), torch.rand(2, 3, 32, 32)
    logits, cls = net(vol, [torch.randn(2, 16, 7), torch.randn(2, 16, 9)], gmap, (4, 4))
    bw = 8
    assert seen == {0: (2, bw, 3, 32, 32), 1: (2, 2 * bw, 3, 16, 16), 2: (2, 2 * bw, 3, 8, 8),
                    3: (2, 4 * bw, 3, 4, 4), 4: (2, 6 * bw, 3, 2, 2), 5: (2, 8 * bw, 3, 2, 2)}
    assert logits.shape == (2, 2, 32, 32) and cls.shape == (2, 4)
    # one or four guidance tensors also work (AGPNet's single layer; GLAD's four)
    assert CostFilterNet(20, 1, [7], 2, base_width=8).sources == [0, 0, 0, 0]
    assert CostFilterNet(20, 4, [7, 7, 7, 7], 2, base_width=8).sources == [0, 1, 2, 3]
    # the volume may come on the token grid: the first conv runs there, then the resize
    logits_grid, _ = net.eval()(torch.randn(2, 20, 3, 4, 4), [torch.randn(2, 16, 7), torch.randn(2, 16, 9)], gmap, (4, 4))
    assert logits_grid.shape == (2, 2, 32, 32)


def test_rcsa_is_residual_channel_then_spatial_attention():
    torch.manual_seed(0)
    fuse = RCSA(4).eval()
    x, f, g = (torch.randn(2, 4, 2, 6, 6) for _ in range(3))
    out = fuse(x, f, g)
    assert out.shape == (2, 4, 2, 6, 6)
    cat = torch.cat([x, f, g], 1)
    w1, w2 = fuse.channel.fc1.weight.flatten(1), fuse.channel.fc2.weight.flatten(1)
    mlp = lambda v: F.relu(v @ w1.T) @ w2.T  # noqa: E731
    ca = torch.sigmoid(mlp(cat.mean((2, 3, 4))) + mlp(cat.amax((2, 3, 4))))[:, :, None, None, None]
    xc = cat + cat * ca
    sa = torch.sigmoid(F.conv3d(torch.cat([xc.mean(1, keepdim=True), xc.amax(1, keepdim=True)], 1),
                                fuse.spatial.conv.weight, padding=3))
    ref = fuse.out(xc + xc * sa)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(fuse.channel, ChannelGate) and isinstance(fuse.spatial, SpatialGate)


def test_official_key_map_covers_every_weight_once():
    net = CostFilterNet(768, 2, [768, 768], 15)
    ours = set(net.state_dict())
    mapping = official_key_map()
    assert set(mapping) == ours
    assert len(set(mapping.values())) == len(mapping)
    fake = {v: net.state_dict()[k] for k, v in mapping.items()}
    fake["decoder_segment.conv2.weight"] = torch.zeros(2, 48, 1, 3, 3)  # the released unused conv: dropped
    net.load_state_dict(convert_official_state_dict(fake))
    with pytest.raises(KeyError, match="not an official"):
        convert_official_state_dict({"x": torch.zeros(1)})


# ------------------------------------------------------------------------------------ losses
def test_focal_loss_and_gamma_rules_follow_their_formulas():
    torch.manual_seed(0)
    prob = torch.softmax(torch.randn(2, 2, 5, 5), 1)
    mask = (torch.rand(2, 1, 5, 5) > 0.5).float()
    gamma = torch.tensor([2.0, 3.5])
    eps = 1e-5
    ref = []
    for i in range(2):
        t = mask[i, 0]
        pt = torch.clamp(1 - t, eps, 1 - eps) * prob[i, 0] + torch.clamp(t, eps, 1 - eps) * prob[i, 1] + eps
        ref.append((-(1 - pt) ** gamma[i] * torch.log(pt)).mean())
    torch.testing.assert_close(focal_loss(prob, mask, gamma), torch.stack(ref).mean())
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    target = torch.tensor([0, 2])  # first correct, second wrong
    paper = focal_gamma(logits, target, "paper", 3.0)
    torch.testing.assert_close(paper, torch.tensor([3.0 - 1 / (1 + math.exp(-2.0)), 3.0]))
    official = focal_gamma(logits, target, "official")
    torch.testing.assert_close(official, torch.tensor([1.5, 3.5]))  # max(3 - 2, 1.5); wrong -> 3.5
    assert focal_gamma(torch.tensor([[0.2, 0.0]]), torch.tensor([0]), "official").item() == pytest.approx(2.8)


def _ssim_direct(a, b, window=11, sigma=1.5):
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :]).float()
    h, wd = a.shape[-2:]
    ap, bp = F.pad(a, (5, 5, 5, 5)), F.pad(b, (5, 5, 5, 5))
    vals = []
    for i in range(h):
        for j in range(wd):
            pa, pb = ap[0, 0, i:i + window, j:j + window], bp[0, 0, i:i + window, j:j + window]
            m1, m2 = (w * pa).sum(), (w * pb).sum()
            v1, v2 = (w * pa * pa).sum() - m1 ** 2, (w * pb * pb).sum() - m2 ** 2
            c = (w * pa * pb).sum() - m1 * m2
            vals.append(((2 * m1 * m2 + 1e-4) * (2 * c + 9e-4)) / ((m1 ** 2 + m2 ** 2 + 1e-4) * (v1 + v2 + 9e-4)))
    return 1 - torch.stack(vals).mean()


def test_ssim_and_soft_iou_losses():
    torch.manual_seed(0)
    a = torch.rand(1, 1, 12, 12)
    b = (torch.rand(1, 1, 12, 12) > 0.6).float()
    torch.testing.assert_close(ssim_loss(a, b), _ssim_direct(a, b), atol=1e-5, rtol=0)
    assert ssim_loss(b, b).item() == pytest.approx(0.0, abs=1e-6)
    inter = (a * b).sum()
    torch.testing.assert_close(soft_iou_loss(a, b), 1 - (inter + 1) / (a.sum() + b.sum() - inter + 1))


def test_costfilter_loss_weights_presets():
    torch.manual_seed(0)
    logits, cls = torch.randn(2, 2, 8, 8), torch.randn(2, 3)
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    ids = torch.tensor([1, 2])
    paper = CostFilterConfig(preset="paper")
    w = {"focal": paper.focal_weight, "ce": paper.ce_weight, "ssim": paper.ssim_weight, "iou": paper.iou_weight,
         "mse": paper.mse_weight}
    total, terms = costfilter_loss(logits, cls, mask, ids, w, "paper")
    assert set(terms) == {"focal", "ce", "ssim", "iou"}  # eq. 5: no MSE
    prob = F.interpolate(torch.softmax(logits, 1), size=(16, 16), mode="bilinear", align_corners=True)
    ref = (focal_loss(prob, mask, focal_gamma(cls, ids, "paper")) + F.cross_entropy(cls, ids)
           + 0.1 * (ssim_loss(prob[:, 1:2], mask) + soft_iou_loss(prob[:, 1:2], mask)))
    torch.testing.assert_close(total, ref)
    off = CostFilterConfig(preset="official")
    assert (off.ce_weight, off.mse_weight, off.gamma_rule, off.lr, off.betas) == (0.5, 1.0, "official", 1e-4, (0.9, 0.98))


# ------------------------------------------------------------------------------------ presets
def test_presets_fill_only_unset_fields_and_unknown_keys_fail():
    cfg = CostFilterConfig.from_params({"preset": "official", "lr": 3e-4})
    assert cfg.lr == 3e-4 and cfg.blend == 0.05 and cfg.query_side == "template" and cfg.from_preset("blend")
    assert not cfg.from_preset("lr")
    p = CostFilterConfig.from_params({})
    assert (p.query_side, p.guidance_map, p.blend, p.score_topk, p.lr, p.epochs, p.batch_size) == \
        ("input", "min", 1.0, 250, 1e-3, 40, 8)
    with pytest.raises(ConfigError, match="unknown costfilter parameter"):
        CostFilterConfig.from_params({"lamda": 0.1})
    with pytest.raises(ConfigError, match="preset"):
        CostFilterConfig.from_params({"preset": "best"})


def test_plateau_schedule_steps_per_epoch_and_survives_json():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    last = {"v": 1.0}
    sched = EpochPlateau(opt, steps_per_epoch=3, loss_fn=lambda: last["v"], factor=0.5, patience=1)
    for _ in range(3 * 3):  # epochs with a flat loss: the first sets best, then patience 1 -> halve
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    state = json.loads(json.dumps({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in sched.state_dict().items()}, default=str))
    other = EpochPlateau(torch.optim.Adam([p], lr=0.5), 3, lambda: 1.0, 0.5, 1)
    other.load_state_dict(state)
    assert other.iteration == 9


# ------------------------------------------------------------------------------------ the plug-in
def _costfilter(base="dinomaly", **kw):
    params = {"base": base, "volume_size": 16, "base_width": 8, "batch_size": 2, **kw}
    if base == "dinomaly":
        params["base_params"] = DINO_SMOKE
    elif base == "patchcore":
        params["base_params"] = {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [2, 3],
                                 "resize": 64, "crop": 64, "target_dim": 64}
    return build_method("costfilter", params).to("cpu")


def _batch(n=2, size=56):
    torch.manual_seed(0)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 10:30, 20:40] = 1
    return {"image": torch.randn(n, 3, size, size), "mask": mask, "class_id": torch.arange(n) % 2,
            "index": torch.arange(n) + 100}


def test_the_base_gets_no_gradient_and_does_not_change():
    m = _costfilter()
    m.build_net(2)
    before = {k: v.clone() for k, v in m.base_method.state_dict().items()}
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-3)
    m.train_mode("filter")
    loss = m.training_step("filter", _batch(), 0)
    loss.backward()
    opt.step()
    assert all(p.grad is None for mod in m.base_method.modules().values() for p in mod.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.base_method.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.parameters())
    assert set(m.trainable_modules()) == {"net"}


def test_predict_returns_the_filtered_and_the_base_prediction_and_state_round_trips():
    m = _costfilter(preset="official")
    m.build_net(3)
    x = _batch()["image"]
    out = m.predict(x)
    assert out.maps.shape == (2, 56, 56) and out.scores.shape == (2,)
    base = m.base_method.predict(x)
    torch.testing.assert_close(out.base.scores, base.scores)
    torch.testing.assert_close(out.base.maps, base.maps)
    state = m.state_dict()
    assert {k.split(".")[0] for k in state} == {"net", "base"}
    fresh = _costfilter(preset="official")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.predict(x).maps, out.maps)
    # official blend: lambda P + (1 - lambda) base map; score = mean of the top max(1 %, 250) pixels
    k = max(250, int(0.01 * 56 * 56))
    torch.testing.assert_close(out.scores, out.maps.flatten(1).topk(k, 1).values.mean(1))


def test_embedding_base_picks_nearest_references_never_itself():
    from uad.methods.costfilter.bases import EmbeddingBase

    m = _costfilter("patchcore", templates=2, reference_pool=3)
    base = m.base
    assert isinstance(base, EmbeddingBase)
    base.ref_global = F.normalize(torch.eye(4, 6), dim=-1)
    base.ref_index = torch.tensor([10, 11, 12, 13])
    base.ref_class = torch.tensor([0, 0, 1, 1])
    g = F.normalize(torch.tensor([[1.0, 0.9, 0, 0, 0, 0]]), dim=-1)
    assert base.nearest(g, None, None).tolist() == [[0, 1]]
    assert base.nearest(g, None, torch.tensor([10])).tolist()[0][0] == 1  # itself (index 10) excluded
    base.class_identity = True
    assert set(base.nearest(g, torch.tensor([1]), None).tolist()[0]) == {2, 3}
    with pytest.raises(ConfigError, match="query_side 'template'"):
        _costfilter("patchcore", query_side="template")


def test_embedding_base_trains_with_a_reference_pool():
    from uad.data.torch_data import AnomalyImageDataset
    import pandas as pd
    from PIL import Image

    m = _costfilter("patchcore", templates=2, reference_pool=2)
    m.base_method.memory_bank = torch.randn(50, 64)
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rows = []
        for i in range(4):
            p = os.path.join(d, f"{i}.png")
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
            rows.append({"image_path": p, "mask_path": "", "label": 0, "class_name": "ab"[i % 2], "defect_type": "good",
                         "split": "train", "dataset": "t"})
        spec = m.input_spec
        ds = AnomalyImageDataset(pd.DataFrame(rows), resize=spec["resize"], crop=spec["crop"], mean=spec["mean"], std=spec["std"])
        m.base.fit_references(ds, 0, torch.device("cpu"))
    assert m.base.ref_images.shape == (4, 3, 64, 64) and m.base.ref_images.dtype == torch.uint8
    m.build_net(2)
    batch = _batch(2, 64)
    batch["index"] = torch.tensor([0, 1])
    loss = m.training_step("filter", batch, 0)
    assert torch.isfinite(loss)
    state = m.state_dict()
    assert "ref.ref_images" in state
    out = m.predict(batch["image"])
    assert out.base is not None and out.maps.shape == (2, 64, 64)


# ------------------------------------------------------------------------------------ GLAD synthesis
def test_glad_recipe_values_and_grid_shuffle():
    cfg = SynthesisConfig.for_recipe("glad")
    assert (cfg.threshold, cfg.structure_probability, cfg.structure_grid) == (0.3, 0.5, 8)
    assert SynthesisConfig.for_recipe("glad", {"threshold": 0.4}).threshold == 0.4
    assert SynthesisConfig.for_recipe(None).threshold == 0.5 and RECIPES["draem"] == {}
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    out = grid_shuffle(img, 4, np.random.default_rng(0))
    src = {img[r:r + 4, c:c + 4].tobytes() for r in range(0, 16, 4) for c in range(0, 16, 4)}
    got = {out[r:r + 4, c:c + 4].tobytes() for r in range(0, 16, 4) for c in range(0, 16, 4)}
    assert src == got and not np.array_equal(out, img)


def test_otsu_foreground_sides_and_glad_table():
    img = np.full((20, 20, 3), 220, np.uint8)
    img[5:15, 5:15] = 30  # a dark object on a bright background
    dark = otsu_foreground(img, bright=False)
    assert dark[5:15, 5:15].all() and not dark[:5].any()
    assert (otsu_foreground(img, bright=True) == ~dark).all()
    assert GLAD_FOREGROUND["screw"] == "otsu_dark" and GLAD_FOREGROUND["hazelnut"] == "otsu_bright"
    assert "carpet" not in GLAD_FOREGROUND


def test_structure_anomalies_change_only_the_masked_pixels():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    synth = PseudoAnomalySynthesizer(ProceduralTextureSource(),
                                     SynthesisConfig.for_recipe("glad", {"anomaly_probability": 1.0,
                                                                         "structure_probability": 1.0}))
    out, mask, label = synth(img, np.random.default_rng(0))
    assert label == 1 and mask.any()
    assert np.array_equal(out[~mask], img[~mask])


def test_recipe_resolution_and_foreground_modes():
    import pandas as pd

    from uad.synthesis.spec import foreground_modes, resolve_recipe

    assert resolve_recipe({}, "glad") == "glad"
    assert resolve_recipe({"recipe": "draem"}, "glad") == "draem"
    assert resolve_recipe({}, None) == "draem"
    with pytest.raises(ValueError, match="recipe"):
        resolve_recipe({"recipe": "cutpaste"})
    classes = pd.Series(["screw", "washer", "carpet", "pill"])
    synth = {"foreground_classes": ["washer"], "foreground_modes": {"pill": "none"}}
    assert foreground_modes(classes, synth, "glad") == ["otsu_dark", "auto", "none", "none"]
    assert foreground_modes(classes, synth, "draem") == ["none", "auto", "none", "none"]


def test_base_view_contract_fields():
    v = BaseView([torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 2)], (2, 2), None,
                 Prediction(torch.zeros(1), torch.zeros(1, 8, 8)), aligned=False)
    assert v.base_map is None and not v.aligned


@pytest.mark.parametrize("base,params,size", [
    ("inpformer", {**DINO_SMOKE}, 56),
    ("rlr", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "resize": 96, "crop": 96}, 96),
    ("agpnet", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [1, 2, 3], "cnn_stride": 8,
                "decoder_dim": 96, "resize": 64, "crop": 64}, 64),
])
def test_every_reconstruction_base_plugs_in(base, params, size):
    m = build_method("costfilter", {"base": base, "base_params": params, "volume_size": 16, "base_width": 8}).to("cpu")
    net = m.build_net(2)
    batch = _batch(2, size)
    loss = m.training_step("filter", batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for mod in m.base_method.modules().values() for p in mod.parameters())
    out = m.predict(batch["image"])
    assert out.maps.shape == (2, size, size) and out.base.maps.shape == (2, size, size)
    view = m.base.view(batch["image"])
    assert net.depth == len(view.queries) and view.aligned
    ref = m.base_method.predict(batch["image"])
    torch.testing.assert_close(out.base.scores, ref.scores)


# ------------------------------------------------------------------------------------ the base's own map
_BASES = [
    ("dinomaly", DINO_SMOKE, 56),
    ("inpformer", DINO_SMOKE, 56),
    ("rlr", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "resize": 96, "crop": 96}, 96),
    ("agpnet", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [1, 2, 3], "cnn_stride": 8,
                "decoder_dim": 96, "resize": 64, "crop": 64}, 64),
    ("patchcore", {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "layers": [2, 3], "resize": 64,
                   "crop": 64, "target_dim": 64}, 64),
]


def _over(base, params, **kw):
    m = build_method("costfilter", {"base": base, "base_params": params, "volume_size": 16, "base_width": 8,
                                    "templates": 2, "reference_pool": 2, **kw}).to("cpu")
    if base == "patchcore":
        torch.manual_seed(5)
        m.base_method.memory_bank = torch.randn(40, 64)
        m.base.ref_global = F.normalize(torch.randn(2, m.base.global_feature(m.base.layers(torch.zeros(1, 3, 64, 64))[0]).shape[1]), dim=-1)
        m.base.ref_images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
        m.base.ref_class = torch.tensor([0, 1])
        m.base.ref_index = torch.tensor([0, 1])
    return m


@pytest.mark.parametrize("base,params,size", _BASES, ids=[b[0] for b in _BASES])
def test_the_official_blend_reads_the_base_own_map_and_score(base, params, size):
    """``base_map: own``: the map guiding the filter and blended into its output is the base's own
    evaluation map, its score the base's own score; with blend 0 the output *is* the base."""
    m = _over(base, params, preset="official", base_map="own", blend=0.0)
    m.build_net(2)
    x = _batch(2, size)["image"]
    ref = m.base_method.predict(x)
    out = m.predict(x)
    torch.testing.assert_close(out.maps, ref.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=1e-6)
    # the matching guidance in training: the same map, resized to the volume, in every channel
    seen = {}
    forward = m.net.forward

    def spy(volume, guidance, gmap, grid):
        seen["gmap"] = gmap.detach().clone()
        return forward(volume, guidance, gmap, grid)

    m.net.forward = spy
    m.cfg.blend = 0.05
    batch = _batch(2, size)
    m.training_step("filter", batch, 0)
    own = m.base_method.predict(batch["image"]).maps
    want = F.interpolate(own[:, None], size=(16, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen["gmap"], want.expand_as(seen["gmap"]), rtol=0, atol=1e-6)
    # blend 0.05: lambda P + (1 - lambda) M_base and lambda s(P) + (1 - lambda) s_base
    m.eval_mode()
    view = m.base.view(x, with_prediction=True)
    logits, _ = m.filter(view)
    prob = m.probability(logits, (size, size))
    maps, scores = m.output(logits, view, (size, size))
    torch.testing.assert_close(maps, 0.05 * prob + 0.95 * ref.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, 0.05 * m.image_score(prob) + 0.95 * ref.scores, rtol=0, atol=1e-6)


def test_base_map_presets_and_the_cosine_path():
    assert CostFilterConfig(preset="official", base="dinomaly").base_map == "cosine"  # the released code
    assert CostFilterConfig(preset="official", base="rlr").base_map == "own"
    assert CostFilterConfig(preset="paper", base="dinomaly").base_map == "own"
    with pytest.raises(ConfigError, match="base_map"):
        CostFilterConfig(base_map="mean")
    with pytest.raises(ConfigError, match="embedding base"):
        _over("patchcore", _BASES[-1][1], preset="official", base_map="cosine")
    # cosine (Dinomaly): the grid map of 1 - cos between input and reconstruction, upsampled, and
    # the score read from the blended map (the released evaluation)
    m = _over("dinomaly", DINO_SMOKE, preset="official")
    m.build_net(2)
    x = _batch(2, 56)["image"]
    view = m.base.view(x, with_prediction=True)
    enc, inputs, recs = m.base_method.reconstruct_groups(x)
    grid_map = torch.stack([1 - F.cosine_similarity(a, b, dim=-1) for a, b in zip(inputs, recs)]).mean(0).reshape(2, 4, 4)
    torch.testing.assert_close(view.base_map, grid_map, rtol=0, atol=1e-6)
    out = m.predict(x)
    logits, _ = m.filter(view)
    up = F.interpolate(grid_map[:, None], size=(56, 56), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(out.maps, 0.05 * m.probability(logits, (56, 56)) + 0.95 * up, rtol=0, atol=1e-6)


def test_training_reads_the_base_prediction_only_when_it_guides():
    calls = []
    m = _over("rlr", _BASES[2][1])  # paper preset: guidance from the volume's minima
    m.build_net(2)
    original = m.base_method.prediction_from
    m.base_method.prediction_from = lambda *a, **k: calls.append(1) or original(*a, **k)
    m.training_step("filter", _batch(2, 96), 0)
    assert calls == []
    m.cfg.guidance_map, m.cfg.base_map = "base", "own"
    m.training_step("filter", _batch(2, 96), 0)
    assert calls == [1]


# ------------------------------------------------------------------------------------ calibrated blend
class _ListDataset:
    def __init__(self, images, masks):
        self.items = [{"image": im, "mask": mk} for im, mk in zip(images, masks)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _calibrated(**kw):
    m = _costfilter(preset="calibrated", **kw)
    m.build_net(2)
    g = torch.Generator().manual_seed(3)
    normals = _ListDataset(torch.randn(4, 3, 56, 56, generator=g), torch.zeros(4, 1, 56, 56))
    mask = torch.zeros(4, 1, 56, 56)
    mask[:, :, 8:24, 16:40] = 1
    pseudo = _ListDataset(torch.randn(4, 3, 56, 56, generator=g) + 2.0 * mask, mask)
    return m, normals, pseudo


def test_calibrated_preset_is_the_paper_filter_with_a_chosen_blend():
    cfg = CostFilterConfig(preset="calibrated")
    paper = CostFilterConfig(preset="paper")
    for name in ("query_side", "guidance_map", "focal_weight", "ce_weight", "lr", "epochs", "score_topk"):
        assert getattr(cfg, name) == getattr(paper, name), name
    assert cfg.calibrate and cfg.blend is None and cfg.base_map == "own" and not paper.calibrate
    with pytest.raises(ConfigError, match="blend is unset"):
        CostFilterConfig(preset="calibrated", calibrate=False)
    with pytest.raises(ConfigError, match="blend_candidates"):
        CostFilterConfig(preset="calibrated", blend_candidates=[0.5, 1.5])
    with pytest.raises(ConfigError, match="base_map"):
        CostFilterConfig(preset="calibrated", base="dinomaly", base_map="cosine")


def test_affine_onto_matches_median_and_upper_quantile():
    from uad.methods.costfilter.calibration import affine_onto

    g = torch.Generator().manual_seed(0)
    p = torch.rand(50_000, generator=g)
    base = 33.0 + 40.0 * torch.rand(50_000, generator=g) ** 2
    a, b = affine_onto(p, base, 0.99)
    mapped = a * p.double() + b
    q = torch.tensor([0.5, 0.99], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(mapped, q), torch.quantile(base.double(), q), rtol=0, atol=1e-9)
    assert a > 0
    # a constant source still maps with a positive scale (a saturated filter)
    a0, _ = affine_onto(torch.full((100,), 0.3), base[:100], 0.99)
    assert a0 == 1.0


def test_calibrated_blend_weight_zero_is_the_base_and_one_is_p():
    """w = 0 returns the base's own map and score bit for bit; w = 1 returns a P * P + b (its
    ranking); the fitted affine is stored in the checkpoint and read back."""
    m, normals, pseudo = _calibrated(blend=0.0)
    figures = m.calibrate(normals, pseudo)
    assert figures["map_weight"] == figures["score_weight"] == 0.0 and figures["weight_chosen"] == 0.0
    x = torch.stack([normals[i]["image"] for i in range(2)])
    out = m.predict(x)
    assert torch.equal(out.maps, out.base.maps) and torch.equal(out.scores, out.base.scores)
    m.cfg.blend = 1.0
    figures = m.calibrate(normals, pseudo)
    a, b = m.calibration.map_affine
    out = m.predict(x)
    view = m.base.view(x, with_prediction=True)
    logits, _ = m.filter(view)
    prob = m.probability(logits, (56, 56))
    torch.testing.assert_close(out.maps, (a * prob.double() + b).float(), rtol=1e-6, atol=1e-6)
    sa, sb = m.calibration.score_affine
    torch.testing.assert_close(out.scores, (sa * m.image_score(prob).double() + sb).float(), rtol=1e-6, atol=1e-6)
    assert figures["val_image_auroc"] == figures["val_p_image_auroc"]
    state = m.state_dict()
    assert {k for k in state if k.startswith("cal.")} == {"cal.weight", "cal.map_affine", "cal.score_affine"}
    fresh = _costfilter(preset="calibrated", blend=1.0)
    fresh.load_state_dict(state)
    assert fresh.calibration.map_affine == m.calibration.map_affine
    torch.testing.assert_close(fresh.predict(x).maps, out.maps)
    # an uncalibrated calibrated filter refuses to predict instead of returning P or the base
    bare = _costfilter(preset="calibrated")
    bare.build_net(2)
    with pytest.raises(RuntimeError, match="no calibration"):
        bare.predict(x)


def test_choose_weights_follow_the_informative_side():
    """On a validation set where only P separates the pseudo anomalies the weights go to P's side;
    where only the base does, to 0; a validation gain under ``min_gain`` keeps the base; the test
    split is not an argument."""
    import inspect

    from uad.methods.costfilter.calibration import ValidationOutputs, choose_weights

    g = torch.Generator().manual_seed(1)
    n, s = 16, 16
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    masks[n // 2:, 4:9, 4:9] = True
    labels = (torch.arange(n) >= n // 2).long()
    signal = masks.float() + 0.05 * torch.randn(n, s, s, generator=g)
    noise = torch.rand(n, s, s, generator=g)
    good = ValidationOutputs(signal, 40 + 10 * noise, signal.flatten(1).amax(1), 40 + 10 * noise.flatten(1).amax(1),
                             masks, labels)
    wm, ws, fig = choose_weights(good, (10.0, 40.0), (10.0, 40.0))
    assert wm >= 0.5 and fig["val_pixel_auroc"] > fig["val_base_pixel_auroc"] + 0.2
    # the smallest weight that separates the images perfectly (ties go to the base's side)
    assert 0.0 < ws < 1.0 and fig["val_image_auroc"] == 1.0 > fig["val_base_image_auroc"]
    bad = ValidationOutputs(noise, 40 + 10 * signal, noise.flatten(1).amax(1), 40 + 10 * signal.flatten(1).amax(1),
                            masks, labels)
    assert choose_weights(bad, (10.0, 40.0), (10.0, 40.0))[:2] == (0.0, 0.0)
    # the same informative P with a gain demanded above what it brings: the base is kept
    assert choose_weights(good, (10.0, 40.0), (10.0, 40.0), min_gain=0.9)[:2] == (0.0, 0.0)
    assert set(inspect.signature(choose_weights).parameters) == {"val", "map_affine", "score_affine", "weights",
                                                                  "min_gain", "confidence", "resamples"}
    assert fig["val_image_gain_share"] >= 0.95 and fig["val_pixel_gain_share"] >= 0.95


def test_bootstrap_test_refuses_a_gain_inside_the_noise():
    """A P that adds noise to the base's score can beat it on one validation set by more than
    ``min_gain`` by chance: without the bootstrap test that weight is taken, with it the base is kept;
    a P that carries signal passes it."""
    import numpy as np

    from uad.methods.costfilter.calibration import ValidationOutputs, choose_weights

    g = torch.Generator().manual_seed(3)
    n, s = 24, 8
    labels = (torch.arange(n) >= n // 2).long()
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    masks[n // 2:, 2:5, 2:5] = True
    base_maps = 40 + 10 * torch.rand(n, s, s, generator=g) + 3.0 * masks.float()
    base_scores = base_maps.flatten(1).amax(1) + 2.0 * torch.randn(n, generator=g)
    found = None
    for trial in range(40):  # a noise P whose best weight beats the base on this set by chance
        gg = torch.Generator().manual_seed(100 + trial)
        p_scores = torch.rand(n, generator=gg)
        val = ValidationOutputs(torch.rand(n, s, s, generator=gg), base_maps, p_scores, base_scores, masks, labels)
        _, ws_plain, fig = choose_weights(val, (10.0, 40.0), (10.0, 40.0), confidence=0.0)
        if ws_plain > 0 and fig["val_image_auroc"] - fig["val_base_image_auroc"] >= 0.005:
            found = val
            break
    assert found is not None, "no chance gain found to test against"
    _, ws, fig = choose_weights(found, (10.0, 40.0), (10.0, 40.0))
    assert ws == 0.0 and fig["val_image_gain_share"] < 0.95
    # P that knows the labels: the same test keeps its weight
    informed = ValidationOutputs(found.p_maps, base_maps, labels.float() + 0.1 * torch.rand(n, generator=g),
                                 base_scores, masks, labels)
    assert choose_weights(informed, (10.0, 40.0), (10.0, 40.0))[1] > 0.0
    assert np.isfinite(fig["val_image_auroc"])


def test_weighted_bootstrap_auroc_equals_the_resample_materialised():
    """The bootstrap's AUROC with per-image counts equals the AUROC of the resample built image by
    image (ties included); a wrong tie rule or a count applied to the wrong item fails it."""
    import numpy as np

    from uad.methods.costfilter.calibration import _groups, _weighted_auroc
    from uad.metrics.metrics import auroc

    rng = np.random.default_rng(5)
    n_img, per = 12, 30
    image_labels = (np.arange(n_img) >= 6).astype(int)
    item_image = np.repeat(np.arange(n_img), per)
    item_labels = ((rng.random(n_img * per) < 0.3) & (image_labels[item_image] == 1)).astype(float)
    scores = np.round(rng.normal(size=n_img * per) + item_labels, 1)  # rounded: many ties
    counts = np.bincount(rng.choice(n_img, size=n_img), minlength=n_img).astype(float)
    g, k = _groups(scores)
    got = _weighted_auroc(g, k, item_labels, counts[item_image])
    idx = np.concatenate([np.flatnonzero(item_image == i) for i in range(n_img) for _ in range(int(counts[i]))])
    assert abs(got - auroc(item_labels[idx], scores[idx])) < 1e-12


def test_map_weight_does_not_buy_pixel_auroc_with_region_overlap():
    """Where P finds the large regions and misses the small ones the base finds, pixel AUROC
    alone (ruled by the large regions' pixels) goes far to P's side and costs the small regions
    their overlap; the chosen map weight is the best pixel AUROC among the weights whose AUPRO
    stays within ``min_gain`` of the base's: smaller, still above the base, and the figures carry
    the validation AUPRO of the base, P and the choice."""
    from uad.methods.costfilter.calibration import ValidationOutputs, best_weight, choose_weights

    g = torch.Generator().manual_seed(4)
    n, s = 40, 24
    labels = (torch.arange(n) >= n // 4).long()
    large = torch.zeros(n, s, s, dtype=torch.bool)
    large[n // 4:, 2:14, 2:14] = True
    small = torch.zeros(n, s, s, dtype=torch.bool)
    for k in range(3):
        small[n // 4:, 18 + 2 * k, 3 + 6 * k] = True
    masks = large | small
    base = 40 + 10 * (torch.rand(n, s, s, generator=g) + 0.35 * large + 1.5 * small)
    p = torch.rand(n, s, s, generator=g) + 1.2 * large.float() - 0.8 * small.float()
    val = ValidationOutputs(p, base, p.flatten(1).amax(1), base.flatten(1).amax(1), masks, labels,
                            sources=torch.arange(n) % (n // 4))
    wm, _, fig = choose_weights(val, (10.0, 40.0), (10.0, 40.0))
    curve = fig["curve"]
    ws = [c[0] for c in curve]
    at = {c[0]: c for c in curve}
    by_pixel = best_weight([c[2] for c in curve], ws, 0.005)[0]
    assert at[by_pixel][3] < at[0.0][3] - 0.005  # the pixel-AUROC choice costs region overlap
    assert 0.0 < wm < by_pixel
    assert at[wm][3] >= at[0.0][3] - 0.005 and at[wm][2] > at[0.0][2] + 0.005
    # the best pixel AUROC among the weights the guard admits
    assert at[wm][2] == max(c[2] for c in curve if c[3] >= at[0.0][3] - 0.005)
    assert fig["val_pixel_aupro"] == at[wm][3] and fig["val_base_pixel_aupro"] == at[0.0][3]
    assert fig["val_p_pixel_aupro"] == at[1.0][3]


def test_cutpaste_changes_only_its_mask_and_is_seeded():
    """CutPaste (the calibration's validation recipe): the image equals its input outside the mask,
    every masked pixel changed, the same (seed, index) gives the same sample, and a foreground
    keeps the paste inside the object."""
    import numpy as np

    from uad.synthesis import SynthesisAugment
    from uad.synthesis.cutpaste import CutPasteSynthesizer

    rng = np.random.default_rng(0)
    img = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    aug = SynthesisAugment(CutPasteSynthesizer(), 7)
    sizes = []
    for i in range(12):
        out, mask, label = aug(img, i)
        assert label == 1 and mask.any()
        assert np.array_equal(out[~mask], img[~mask])
        assert (out[mask] != img[mask]).any(axis=-1).all()
        again = aug(img, i)
        assert np.array_equal(again[0], out) and np.array_equal(again[1], mask)
        sizes.append(int(mask.sum()))
    assert len(set(sizes)) > 6  # both kinds (rectangles, scars) at drawn sizes
    fg = np.zeros((96, 96), dtype=bool)
    fg[30:70, 30:70] = True
    for i in range(8):
        out, mask, _ = CutPasteSynthesizer()(img, np.random.default_rng(i), fg, True)
        assert not (mask & ~fg).any() and np.array_equal(out[~fg], img[~fg])
