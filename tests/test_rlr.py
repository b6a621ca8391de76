"""RLR: masks, attention mixers, block, loss, map, score, reference shapes, training and state.

Direct formulas are the oracle. The method itself runs on the bundled ImageNet EfficientNet-Lite0
(offline) at 64 px: maps of 16 x 16, 8 x 8 and 4 x 4, so windows 11 / 7 / 5 would swallow the
smallest map; the small tests use explicit windows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from uad.methods.registry import build_method
from uad.methods.rlr import RLR, RLRConfig
from uad.methods.rlr.losses import anomaly_map, feature_jitter, local_average, reconstruction_loss
from uad.methods.rlr.model import RLRBlock, ReferenceAttention, ReferenceReconstructor, neighbour_window, sincos_pos_embed_2d

LITE = dict(backbone="tf_efficientnet_lite0", weights="bundled", resize=64, crop=64, windows=[5, 3, 3])


@pytest.fixture(scope="module")
def method() -> RLR:
    return build_method("rlr", LITE)


def _direct_window(h, w, win):
    r = win // 2
    out = torch.zeros(h * w, h * w, dtype=torch.bool)
    for y1 in range(h):
        for x1 in range(w):
            for y2 in range(max(0, y1 - r), min(h, y1 + r + 1)):
                for x2 in range(max(0, x1 - r), min(w, x1 + r + 1)):
                    out[y1 * w + x1, y2 * w + x2] = True
    return out


# ------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("h,w,win", [(5, 4, 3), (6, 6, 5), (8, 8, 11), (3, 7, 1)])
def test_window_matches_the_clipped_neighbourhood(h, w, win):
    assert torch.equal(neighbour_window(h, w, win), _direct_window(h, w, win))


def test_masks_which_tokens_each_mixer_sees():
    win = neighbour_window(4, 4, 3)
    # corner (0, 0): clipped at the border, sees itself and 3 neighbours
    assert set(win[0].nonzero().flatten().tolist()) == {0, 1, 4, 5}
    # centre token (1, 1) = 5: the full 3 x 3 window
    assert set(win[5].nonzero().flatten().tolist()) == {0, 1, 2, 4, 5, 6, 8, 9, 10}
    lca = ReferenceAttention(8, 2, "lca")
    mlka = ReferenceAttention(8, 2, "mlka")
    assert lca.mask_kind == "window" and mlka.mask_kind == "outside"
    # MLKA hides the token itself: its attention to itself is exactly zero (through the output)
    torch.manual_seed(0)
    y, r = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    base = mlka(y, r, win)
    y2 = y.clone()
    y2[0, 5] += 10.0  # change token 5: its value is visible only outside its own window
    changed = (mlka(y2, r, win) - base).abs().sum(-1)[0]
    # Value/key leakage check: a token whose value changes influences only tokens outside its window
    # (for which it is visible) - except through its own query, i.e. at position 5 itself.
    outside = (~win[5]).nonzero().flatten()
    inside_others = [i for i in win[5].nonzero().flatten().tolist() if i != 5]
    assert torch.all(changed[outside] > 0)
    assert torch.all(changed[inside_others] == 0)


# ---------------------------------------------------------------------------- attention
def _direct_attention(att: ReferenceAttention, y, r, additive):
    def lin(m, x):
        return x @ m.weight.T + m.bias

    b, n, d = y.shape
    hd = d // att.heads
    kin = r.expand(b, -1, -1) if att.key_src == "r" else y
    vin = r.expand(b, -1, -1) if att.value_src == "r" else y
    q = lin(att.q, y).reshape(b, n, att.heads, hd).permute(0, 2, 1, 3)
    k = lin(att.k, kin).reshape(b, n, att.heads, hd).permute(0, 2, 1, 3)
    v = lin(att.v, vin).reshape(b, n, att.heads, hd).permute(0, 2, 1, 3)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + additive, dim=-1)
    out = (a @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return lin(att.proj, out)


@pytest.mark.parametrize("kind", ["lca", "mlka", "cross", "self", "masked_self"])
def test_mixers_match_the_direct_formula(kind):
    torch.manual_seed(1)
    h = w = 5
    win = neighbour_window(h, w, 3)
    att = ReferenceAttention(16, 4, kind)
    y, r = torch.randn(2, h * w, 16), torch.randn(1, h * w, 16)
    inf = torch.full((h * w, h * w), float("-inf"))
    zero = torch.zeros(h * w, h * w)
    m_loc = torch.where(win, zero, inf)  # eq. 11: 0 inside the window, -inf outside
    m_nei = torch.where(win, inf, zero)  # eq. 8: -inf on the window, the token itself included
    additive = {"lca": m_loc, "mlka": m_nei, "cross": zero, "self": zero, "masked_self": m_nei}[kind]
    torch.testing.assert_close(att(y, r, win), _direct_attention(att, y, r, additive), atol=1e-5, rtol=1e-5)


def test_block_has_no_residual_around_attention():
    """Eq. 4-5: Z = LN(MLKA + alpha LCA), Y' = LN(FFN(Z) + Z); residual=True adds Y inside the first LN."""
    torch.manual_seed(2)
    win = neighbour_window(4, 4, 3)
    y, r = torch.randn(2, 16, 8), torch.randn(1, 16, 8)
    blk = RLRBlock(8, 2, ["lca", "mlka"], [2.0, 1.0])
    lca, mlka = blk.mixers
    z = blk.norm1(2.0 * lca(y, r, win) + mlka(y, r, win))
    torch.testing.assert_close(blk(y, r, win), blk.norm2(z + blk.mlp(z)))
    blk.residual = True
    z = blk.norm1(y + 2.0 * lca(y, r, win) + mlka(y, r, win))
    torch.testing.assert_close(blk(y, r, win), blk.norm2(z + blk.mlp(z)))


def test_reference_is_shared_by_the_batch_and_the_output_of_lca_only_depends_on_the_query():
    """LCA's keys and values come from the reference alone: two images with the same query tokens
    get the same LCA output whatever else differs."""
    torch.manual_seed(3)
    rec = ReferenceReconstructor(6, (4, 4), 8, 3, depth=1, num_heads=2, kinds=["lca"], weights=[2.0])
    x = torch.randn(1, 16, 6)
    out = rec(torch.cat([x, x]))
    torch.testing.assert_close(out[0], out[1])


def test_pos_embed_formula():
    h, w, d = 3, 5, 8
    pe = sincos_pos_embed_2d(h, w, d).reshape(h, w, d)
    half = d // 2
    for y in range(h):
        for x in range(w):
            for k in range(half // 2):
                f = math.exp(-(2 * k) * math.log(1e4) / half)
                assert pe[y, x, 2 * k] == pytest.approx(math.sin(x * f), abs=1e-6)
                assert pe[y, x, 2 * k + 1] == pytest.approx(math.cos(x * f), abs=1e-6)
                assert pe[y, x, half + 2 * k] == pytest.approx(math.sin(y * f), abs=1e-6)
                assert pe[y, x, half + 2 * k + 1] == pytest.approx(math.cos(y * f), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 6)


# ---------------------------------------------------------------------- noise, loss, map
def test_local_average_is_zero_padded_3x3_mean():
    x = torch.randn(1, 2, 5, 5)
    out = local_average(x, 3)
    pad = F.pad(x, (1, 1, 1, 1))
    assert out[0, 1, 0, 0] == pytest.approx(float(pad[0, 1, 0:3, 0:3].sum() / 9), abs=1e-6)
    assert out[0, 0, 2, 3] == pytest.approx(float(x[0, 0, 1:4, 2:5].mean()), abs=1e-6)
    assert torch.equal(local_average(x, 1), x)


def test_feature_jitter_scale_and_fraction():
    torch.manual_seed(4)
    t = torch.randn(3, 10, 6)
    eps = torch.randn(3, 10, 6)
    expected = t + eps * t.norm(dim=-1, keepdim=True) / 6 * 4.0
    torch.testing.assert_close(feature_jitter(t, 4.0, 1.0, noise=eps), expected)
    half = feature_jitter(t, 4.0, 0.5, noise=eps)
    clean = (half == t).all(dim=-1)  # B, N
    assert clean.sum(dim=1).tolist() == [5, 5, 5]  # int((1 - 0.5) * 10) tokens stay clean
    torch.testing.assert_close(half[~clean], expected[~clean])
    assert torch.equal(feature_jitter(t, 0.0), t)


def test_loss_matches_its_formula():
    torch.manual_seed(5)
    out, tgt = torch.randn(2, 12, 7), torch.randn(2, 12, 7)
    mse = ((out - tgt) ** 2).mean()
    cos = (1 - (out * tgt).sum(-1) / (out.norm(dim=-1) * tgt.norm(dim=-1))).mean()
    assert float(reconstruction_loss(out, tgt)) == pytest.approx(float(mse + cos), rel=1e-6)
    l2 = (out - tgt).norm(dim=-1).mean()
    assert float(reconstruction_loss(out, tgt, "l2")) == pytest.approx(float(l2 + cos), rel=1e-6)


def test_map_and_score_match_their_formulas(method):
    torch.manual_seed(6)
    grids = [(4, 4), (2, 2)]
    outs = [torch.randn(2, 16, 3), torch.randn(2, 4, 5)]
    tgts = [torch.randn(2, 16, 3), torch.randn(2, 4, 5)]
    maps = anomaly_map(outs, tgts, grids, (9, 9))
    expected = 0
    for o, t, (h, w) in zip(outs, tgts, grids):
        s = ((o - t) ** 2).mean(-1) + 1 - F.cosine_similarity(o, t, dim=-1)
        expected = expected + F.interpolate(s.reshape(2, 1, h, w), size=(9, 9), mode="bilinear", align_corners=True)
    torch.testing.assert_close(maps, expected[:, 0] / 2)
    # image score: the max of scipy's gaussian_filter(sigma=4) of the unsmoothed map
    images = torch.randn(2, 3, 64, 64)
    pred = method.predict(images)
    ref = np.array([gaussian_filter(m.numpy().astype(np.float64), sigma=4).max() for m in pred.maps])
    np.testing.assert_allclose(pred.scores.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert pred.maps.shape == (2, 64, 64)


# ----------------------------------------------------------------------- method wiring
def test_config_defaults_are_the_papers():
    cfg = RLRConfig()
    assert cfg.backbone.startswith("tf_efficientnet_b6") and cfg.layers == [1, 2, 3]
    assert (cfg.resize, cfg.crop, cfg.depth, cfg.num_heads, cfg.alpha) == (256, 256, 4, 8, 2.0)
    assert cfg.attention == ["lca", "mlka"] and not cfg.residual
    assert (cfg.lr, cfg.epochs, cfg.weight_decay) == (1e-4, 200, 0.0)
    assert [cfg.hidden_dim(i, s) for i, s in enumerate(cfg.layers)] == [128, 256, 512]
    assert [cfg.window(i, s) for i, s in enumerate((4, 8, 16))] == [11, 7, 5]
    assert [RLRConfig(window_order="paper").window(i, s) for i, s in enumerate((4, 8, 16))] == [5, 7, 11]
    # Kedro splits --params on commas: lists may be written "2+3" / "lca+mlka"
    cli = RLRConfig.from_params({"layers": "2+3", "attention": "lca", "windows": "7 5"})
    assert (cli.layers, cli.attention, cli.windows) == ([2, 3], ["lca"], [7, 5])
    with pytest.raises(ValueError, match="unknown rlr parameter"):
        RLRConfig.from_params({"windos": [1]})
    with pytest.raises(ValueError, match="attention"):
        RLRConfig.from_params({"attention": ["lca", "bogus"]})


def test_reference_shape_per_level_comes_from_the_backbone(method):
    # Lite0 stages 1-3 at 64 px: strides 4 / 8 / 16, channels 24 / 40 / 112
    assert method.grids == [(16, 16), (8, 8), (4, 4)]
    shapes = [tuple(lvl.reference.shape) for lvl in method.model.levels]
    assert shapes == [(256, 24), (64, 40), (16, 112)]
    assert method.hidden_dims == [128, 256, 512]
    assert [lvl.window_size for lvl in method.model.levels] == [5, 3, 3]
    assert method.input_spec["resize"] == 64 and method.tags()["weights_source"] == "bundled"


def test_a_window_covering_the_map_is_refused():
    with pytest.raises(ValueError, match="covers the whole"):
        build_method("rlr", {**LITE, "windows": None})  # 5 x 5 window on the 4 x 4 map


def test_iterations_follow_the_epochs(method):
    """200 epochs of MVTec's 3,629 images at batch 4, last partial batch kept; ``iterations`` wins."""
    assert method.iterations_for(3629) == 181450 == method.configure_optimization("train", 3629).iterations
    assert method.iterations_for(3) == 150  # ceil(200 * 3 / 4)
    method.cfg.iterations = 7
    try:
        assert method.iterations_for(3629) == 7
    finally:
        method.cfg.iterations = None


@pytest.mark.parametrize("attention,residual", [(["self"], True), (["cross"], True), (["cross"], False),
                                                (["mlka"], False), (["lca"], False), (["cross", "mlka"], False)])
def test_table3_variants_build_and_train(method, monkeypatch, attention, residual):
    import uad.backbones

    monkeypatch.setattr(uad.backbones, "build_backbone", lambda *a, **k: method.encoder)
    m = build_method("rlr", {**LITE, "attention": attention, "residual": residual})
    setup = m.configure_optimization("train", 8)
    m.train_mode("train")
    loss = m.training_step("train", {"image": torch.randn(2, 3, 64, 64)}, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in setup.parameters)
    has_reference = any(a in ("lca", "mlka", "cross") for a in attention)
    assert all((lvl.reference is not None) == has_reference for lvl in m.model.levels)


def test_encoder_gets_no_gradient_and_training_reduces_the_loss(method):
    torch.manual_seed(7)
    m = build_method("rlr", {**LITE, "lr": 1e-3, "noise_scale": 0.0})
    setup = m.configure_optimization("train", 8)
    x = {"image": torch.randn(4, 3, 64, 64)}
    losses = []
    for step in range(8):
        m.train_mode("train")
        loss = m.training_step("train", x, step)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is None and not p.requires_grad for p in m.encoder.parameters())
    assert m.encoder.training is False


def test_state_round_trip_gives_identical_predictions(method):
    state = method.state_dict()
    assert not any(k.endswith((".window", ".outside", ".pos")) for k in state)  # derived, not saved
    assert all(torch.equal(lvl.outside, ~lvl.window) for lvl in method.model.levels)  # MLKA's mask, built once
    assert state["model.levels.0.reference"].shape == (256, 24)
    fresh = build_method("rlr", {**LITE, "seed": 99})
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fresh.predict(x).maps, method.predict(x).maps)


def test_one_class_setting_trains_one_model_per_class(tmp_path):
    """The shared settings reach RLR: one_class trains a model per class into one checkpoint."""
    from uad.data.synthetic import ensure_synthetic_dataset
    from uad.framework.pipelines.ingest.nodes import build_sample_index
    from uad.framework.pipelines.method.nodes import train_stage

    root = tmp_path / "d"
    ensure_synthetic_dataset(root, seed=0, classes=["wood", "fabric"], n_train=2, n_test_good=1, n_test_bad_per_defect=1)
    index = build_sample_index({"root": str(root), "layout": "mvtec"})
    params = {**LITE, "iterations": 1, "batch_size": 2}
    ckpt, _, tags = train_stage("rlr", "train", index[index["split"] == "train"], {"setting": "one_class"}, params,
                                {"device": "cpu", "progress": False}, {})
    refs = sorted(k for k in ckpt["tensors"] if k.endswith("levels.0.reference"))
    assert refs == ["fabric::model.levels.0.reference", "wood::model.levels.0.reference"]
    assert not torch.equal(ckpt["tensors"][refs[0]], ckpt["tensors"][refs[1]])  # trained apart
    assert tags["setting"] == "one_class" and ckpt["meta"]["method"] == "rlr"


def _stepping(mode: str, steps: int, resume_at: int | None = None) -> dict[str, torch.Tensor]:
    """Parameters after ``steps`` engine steps of a tiny RLR in stepping ``mode``; ``resume_at``:
    the gradients are dropped before that step (what a resumed run starts with)."""
    from uad.engine.trainer import optimisation_step

    m = build_method("rlr", {**LITE, "noise_scale": 0.0, "optimizer_steps": mode}).to("cpu")
    setup = m.configure_optimization("train", 10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for s in range(steps):
        if s == resume_at:
            for p in setup.parameters:
                p.grad = None
        optimisation_step(m, "train", setup, {"image": x}, s)
    return {k: v.clone() for k, v in m.model.state_dict().items()}


def test_per_level_stepping_is_the_released_loop_on_old_torch():
    """``optimizer_steps: per_level``: per level zero_grad(set_to_none=False), backward, Adam
    step (the released loop as it ran on torch < 2.0: a level with a zero-filled gradient still
    moves); ``summed`` is one step on the summed loss. A direct loop is the oracle."""
    m = build_method("rlr", {**LITE, "noise_scale": 0.0}).to("cpu")
    opt = torch.optim.Adam(m.model.parameters(), lr=m.cfg.lr)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        targets = m.encode(x)
        for lvl, t in zip(m.model.levels, targets):  # each level's forward after the previous step
            opt.zero_grad(set_to_none=False)
            reconstruction_loss(lvl(t), t).backward()
            opt.step()
    direct = m.model.state_dict()
    per_level = _stepping("per_level", 2)
    for k, v in direct.items():
        torch.testing.assert_close(per_level[k], v, rtol=1e-5, atol=1e-7)
    summed = _stepping("summed", 2)
    moved = max((summed[k] - per_level[k]).abs().max().item() for k in summed)
    assert moved > 1e-5  # level 0 takes two zero-gradient Adam steps more per iteration
    # a resumed run (no gradients kept) continues exactly as the uninterrupted one
    resumed = _stepping("per_level", 3, resume_at=2)
    uninterrupted = _stepping("per_level", 3)
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    with pytest.raises(Exception, match="optimizer_steps"):
        RLRConfig(optimizer_steps="each")
