"""Dinomaly: what makes it Dinomaly (config defaults, model wiring, loss, training, state).

Uses a randomly initialised DINOv2-R ViT-S/14 at 56 x 56 (4 x 4 tokens + 5 prefix tokens):
the weights do not matter for these checks, and no network is needed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uad.methods.common import LinearAttention, SoftmaxAttention, default_layers, global_cosine_loss, resolve_groups
from uad.methods.dinomaly import Dinomaly, DinomalyConfig, DinomalyModel
from uad.methods.registry import build_method

TINY = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56)


@pytest.fixture(scope="module")
def method() -> Dinomaly:
    return build_method("dinomaly", TINY)


@pytest.fixture
def build(method, monkeypatch):
    """Build more Dinomaly variants re-using the fixture's random encoder (saves a ViT init
    per build and gives every variant the same frozen weights, as pretrained ones would)."""
    import uad.backbones

    monkeypatch.setattr(uad.backbones, "build_backbone", lambda *a, **k: method.encoder)
    return lambda **over: build_method("dinomaly", {**TINY, **over})


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 56, 56, generator=g)


def test_config_paper_defaults():
    c = DinomalyConfig()
    assert c.backbone == "dinov2_vitb14_reg" and (c.resize, c.crop) == (448, 392)
    assert c.bottleneck_dropout == 0.2 and c.noisy_bottleneck and c.decoder_depth == 8
    assert c.attention == "linear" and c.ln_eps == 1e-8 and c.groups == 2 and c.loose_loss
    assert (c.hm_final, c.hm_warmup_iters, c.hm_shrink) == (0.9, 1000, 0.1)
    assert (c.lr, c.final_lr, c.betas, c.weight_decay, c.eps, c.amsgrad) == (2e-3, 2e-4, (0.9, 0.999), 1e-4, 1e-10, True)
    assert (c.warmup_iters, c.iterations, c.batch_size, c.grad_clip, c.init_std, c.seed) == (100, 10000, 16, 0.1, 0.01, 1)
    assert (c.sigma, c.top_k_ratio) == (4.0, 0.01)
    assert default_layers(12) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert default_layers(24) == [4, 6, 8, 10, 12, 14, 16, 18]


def test_from_params_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError) as err:
        DinomalyConfig.from_params({"lr": 1e-3, "dropuot": 0.1})
    msg = str(err.value)
    assert "dropuot" in msg and "bottleneck_dropout" in msg and "loose_loss" in msg
    with pytest.raises(ValueError):
        DinomalyConfig.from_params({"attention": "quadratic"})
    c = DinomalyConfig.from_params({"betas": [0.8, 0.9], "groups": "dense"})
    assert c.betas == (0.8, 0.9) and c.groups == "dense"


def test_model_mean_input_reversed_outputs_and_init():
    torch.manual_seed(0)
    m = DinomalyModel(32, 4, depth=3, bottleneck_dropout=0.0).eval()
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(float(lin.weight.detach().abs().max()) <= 0.03 + 1e-7 for lin in linears)
    assert all(torch.all(lin.bias == 0) for lin in linears)
    w = torch.cat([lin.weight.detach().flatten() for lin in linears])
    assert 0.0095 < float(w.std()) < 0.0102  # N(0, 0.01) truncated at 3 std has std 0.00986
    assert all(torch.all(b.norm1.weight == 1) and torch.all(b.norm1.bias == 0) for b in m.decoder)
    layers = [torch.randn(2, 6, 32) for _ in range(4)]
    seen = {}
    m.bottleneck.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))
    blocks = []
    for blk in m.decoder:
        blk.register_forward_hook(lambda mod, inp, out: blocks.append(out))
    outs = m(layers)
    torch.testing.assert_close(seen["x"], torch.stack(layers).mean(0))
    assert len(outs) == 3 and all(o.shape == (2, 6, 32) for o in outs)
    assert outs[0] is blocks[-1] and outs[-1] is blocks[0]  # last block pairs with shallowest layer


def test_method_shapes_prefix_through_decoder_and_predict(method):
    assert method.layers == [2, 3, 4, 5, 6, 7, 8, 9]
    assert method.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert isinstance(method.model.decoder[0].attn, LinearAttention)
    assert method.model.bottleneck.drop.p == 0.2
    x = _images()
    enc = method.encode(x)
    assert len(enc.tokens) == 8 and enc.tokens[0].shape == (2, 16, 384) and enc.grid == (4, 4)
    seen = {}
    h = method.model.decoder[0].register_forward_pre_hook(lambda mod, inp: seen.update(n=inp[0].shape[1]))
    e, d = method.decode(enc)
    h.remove()
    assert seen["n"] == 16 + 5  # class + 4 registers go through the decoder too
    assert len(e) == len(d) == 2 and all(t.shape == (2, 16, 384) for t in e + d)
    torch.testing.assert_close(e[0], torch.stack(enc.tokens[:4]).mean(0))
    pred = method.predict(x)
    assert pred.scores.shape == (2,) and pred.maps.shape == (2, 56, 56)
    assert pred.scores.dtype == pred.maps.dtype == torch.float32 and pred.maps.device.type == "cpu"
    assert torch.all(pred.maps >= 0)
    top = pred.maps.flatten(1).topk(int(56 * 56 * 0.01), dim=1).values.mean(1)
    torch.testing.assert_close(pred.scores, top)
    spec = method.input_spec
    assert (spec["resize"], spec["crop"]) == (64, 56) and len(spec["mean"]) == 3
    tags = method.tags()
    assert tags["backbone"] == "dinov2_vits14_reg" and tags["weights_source"] == "random"


def test_loss_hard_mining_follows_ramp(method):
    assert method.hard_mining_ratio(0) == 0.0
    assert method.hard_mining_ratio(500) == pytest.approx(0.45)
    assert method.hard_mining_ratio(10_000) == pytest.approx(0.9)
    torch.manual_seed(0)
    e = [torch.randn(2, 16, 8) for _ in range(2)]
    d = [torch.randn(2, 16, 8, requires_grad=True) for _ in range(2)]
    loss = method.loss(e, d, step=1000)
    torch.testing.assert_close(loss, global_cosine_loss(e, d))
    loss.backward()
    dist = 1 - F.cosine_similarity(e[0], d[0].detach(), dim=-1)
    d_ref = d[0].detach().clone().requires_grad_(True)
    global_cosine_loss(e, [d_ref, d[1].detach()]).backward()
    ratio = (d[0].grad / d_ref.grad)[..., 0].flatten()
    order = dist.flatten().argsort()
    n_shrunk = 32 - int(32 * (1 - 0.9))  # 29 of the 32 points
    torch.testing.assert_close(ratio[order[:n_shrunk]], torch.full((n_shrunk,), 0.1))
    torch.testing.assert_close(ratio[order[n_shrunk:]], torch.ones(32 - n_shrunk))


def test_state_dict_round_trip(method, build):
    state = method.state_dict()
    assert state and all(k.startswith("model.") for k in state)
    assert not any(k.startswith("encoder.") for k in state)
    other = build(seed=7)
    x = _images(seed=3)
    ref = method.predict(x)
    assert not torch.allclose(other.predict(x).maps, ref.maps)
    other.load_state_dict(state)
    out = other.predict(x)
    torch.testing.assert_close(out.maps, ref.maps)
    torch.testing.assert_close(out.scores, ref.scores)


def test_ablation_switches(build):
    base = build(attention="softmax", groups="dense", noisy_bottleneck=False, loose_loss=False)
    assert isinstance(base.model.decoder[0].attn, SoftmaxAttention)
    assert base.groups == [[i] for i in range(8)] and base.model.bottleneck.drop.p == 0.0
    e, d = base.decode(base.encode(_images()))
    assert len(e) == len(d) == 8
    assert DinomalyConfig.from_params({"groups": 1}).groups == 1
    assert resolve_groups(1, 8) == [list(range(8))]
    with pytest.raises(ValueError):
        build(layers=[1, 2, 3])


def test_short_training_run_decreases_loss(build):
    # two encoder layers / two decoder blocks keep this fast on a shared 2-core CPU
    m = build(layers=[2, 3], decoder_depth=2, iterations=10, warmup_iters=0, hm_warmup_iters=5)
    setup = m.configure_optimization("train", 8)
    assert setup.grad_clip_norm == 0.1 and setup.iterations == 10
    batch = {"image": _images(4, seed=1)}
    losses = []
    for step in range(10):
        m.train_mode("train")
        loss = m.training_step("train", batch, step)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.parameters, setup.grad_clip_norm)
        setup.optimizer.step()
        setup.scheduler.step()
        losses.append(float(loss.detach()))
    assert all(v == v for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert not m.encoder.training and all(not p.requires_grad for p in m.encoder.parameters())


def test_class_separated_setting_uses_the_papers_schedule():
    from uad.methods.registry import build_method

    base = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56)
    m = build_method("dinomaly", base)
    m.adapt_to_setting("one_class")
    assert (m.cfg.iterations, m.cfg.hm_warmup_iters) == (5000, 500)
    m = build_method("dinomaly", base)
    m.adapt_to_setting("multi_class")
    assert (m.cfg.iterations, m.cfg.hm_warmup_iters) == (10000, 1000)
    m = build_method("dinomaly", {**base, "iterations": 77})
    m.adapt_to_setting("one_class")
    assert (m.cfg.iterations, m.cfg.hm_warmup_iters) == (77, 500)
