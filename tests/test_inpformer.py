"""INP-Former++: blocks against direct formulas, losses against hand computations, the
stop-gradient of residual learning, eq. 9, state round-trip and a short two-stage training on a
tiny random ViT-S (CPU, small tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uad.methods.inpformer.config import INPFormerConfig
from uad.methods.inpformer.losses import (
    dice_loss,
    inp_coherence_loss_hard,
    inp_coherence_loss_soft,
    soft_mining_loss,
    soft_mining_weights,
)
from uad.methods.inpformer.model import (
    INPExtractor,
    INPGuidedAttention,
    INPGuidedDecoderBlock,
    SegmentationHead,
    combine_anomaly_maps,
    reconstruction_error_map,
    residual_features,
)

TINY = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=56, crop=56, batch_size=4)
# a shallower variant for the tests that train: 2 encoder layers / 2 decoder blocks / 2 groups
SHALLOW = dict(layers=[2, 3], decoder_depth=2, groups=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the tiny tensors here gain nothing from more, and on a shared
    2-core machine oversubscribed OpenMP threads slow every op down several-fold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _method(**over):
    from uad.methods.registry import build_method

    return build_method("inpformer", {**TINY, **over})


# --- config ------------------------------------------------------------------------------------
def test_config_defaults_and_unknown_keys():
    cfg = INPFormerConfig()
    assert (cfg.backbone, cfg.resize, cfg.crop, cfg.num_inp_tokens, cfg.decoder_depth) == ("dinov2_vitb14_reg", 448, 392, 6, 8)
    assert (cfg.coherence, cfg.coherence_weight, cfg.gamma, cfg.lr, cfg.weight_decay) == ("soft", 0.2, 3.0, 5e-4, 1e-4)
    assert cfg.stages == ("reconstruction", "residual")
    assert INPFormerConfig.from_params({"residual_learning": False}).stages == ("reconstruction",)
    with pytest.raises(ValueError, match="valid parameters:.*num_inp_tokens"):
        INPFormerConfig.from_params({"num_inps": 4})
    with pytest.raises(ValueError, match="coherence"):
        INPFormerConfig.from_params({"coherence": "medium"})


# --- blocks ------------------------------------------------------------------------------------
def test_inp_extractor_shapes():
    torch.manual_seed(0)
    ext = INPExtractor(dim=32, num_tokens=6, num_heads=4)
    p = ext(torch.randn(3, 20, 32))
    assert p.shape == (3, 6, 32)
    assert ext.num_tokens == 6


def test_inp_guided_attention_matches_direct_formula():
    torch.manual_seed(0)
    dim, heads, n, m = 16, 4, 7, 3
    att = INPGuidedAttention(dim, heads)
    with torch.no_grad():
        att.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(heads, 1, 1))
    x, p = torch.randn(2, n, dim), torch.randn(2, m, dim)
    out = att(x, p)
    d = dim // heads
    q = att.q(x)
    k, v = att.kv(p).split(dim, dim=-1)
    ref = torch.zeros(2, n, dim)
    for b in range(2):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qh = F.normalize(q[b, :, sl], dim=-1)
            kh = F.normalize(k[b, :, sl], dim=-1)
            a = torch.clamp(qh @ kh.T * att.scale[h, 0, 0], min=0.0)  # ReLU(Q K^T), (n, m), no softmax
            ref[b, :, sl] = a @ v[b, :, sl]
    ref = att.proj(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_inp_guided_block_has_no_first_residual():
    torch.manual_seed(0)
    blk = INPGuidedDecoderBlock(16, 4)
    x, p = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    y = blk.attn(blk.norm1(x), blk.norm1(p))
    torch.testing.assert_close(blk(x, p), y + blk.mlp(blk.norm2(y)))
    # the output depends on x only through the attention weights: with all attention weights
    # zero (scale 0), the output ignores x entirely
    with torch.no_grad():
        blk.attn.scale.zero_()
    torch.testing.assert_close(blk(x, p), blk(torch.randn(1, 5, 16), p))


def test_segmentation_head_shape_and_residual_features():
    head = SegmentationHead(8, (6, 4))
    out = head(torch.randn(2, 8, 3, 3), out_size=(20, 20))
    assert out.shape == (2, 1, 20, 20)
    assert head(torch.randn(2, 8, 3, 3)).shape == (2, 1, 12, 12)
    q = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])]
    d = [torch.tensor([[[0.0, 1.0]]], requires_grad=True), torch.tensor([[[0.0, 1.0]]], requires_grad=True)]
    res = residual_features(q, d)
    # group 1: cos = 0 -> (1 - 0) * |(1, -1)| = (1, 1); group 2: cos = 1 -> 0 -> mean (0.5, 0.5)
    torch.testing.assert_close(res, torch.tensor([[[0.5, 0.5]]]))
    assert not res.requires_grad


# --- losses ------------------------------------------------------------------------------------
def test_soft_coherence_loss_by_hand():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # B=1, N=3, C=2
    p = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # M=2
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])  # cosines (N, M)
    w = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    f_hat = w @ p[0]
    ff, fh = f[0].flatten(), f_hat.flatten()
    expected = 1 - (ff @ fh) / (ff.norm() * fh.norm())
    torch.testing.assert_close(inp_coherence_loss_soft(f, p), expected)
    # hard (eq. 2): nearest-INP cosine distances 0, 0, 1 - 1/sqrt(2)
    torch.testing.assert_close(inp_coherence_loss_hard(f, p), torch.tensor((1 - 1 / math.sqrt(2)) / 3))


def test_soft_mining_gradient_weights():
    torch.manual_seed(0)
    gamma = 3.0
    q = torch.randn(2, 5, 4)  # B, N, C
    d0 = torch.randn(2, 5, 4)

    d = d0.clone().requires_grad_(True)
    loss = soft_mining_loss([q], [d], gamma=gamma, dim=-1)
    loss.backward()

    # plain gradients of each term
    dc = d0.clone().requires_grad_(True)
    (1 - F.cosine_similarity(q.reshape(2, -1), dc.reshape(2, -1), dim=1)).mean().backward()
    dm = d0.clone().requires_grad_(True)
    ((q - dm) ** 2).mean(-1).mean().backward()

    # weights by hand: (M / mean(M)) ** gamma per point
    m_cos = 1 - F.cosine_similarity(q, d0, dim=-1)
    m_mse = ((q - d0) ** 2).mean(-1)
    w_cos = ((m_cos / m_cos.mean()) ** gamma).unsqueeze(-1)
    w_mse = ((m_mse / m_mse.mean()) ** gamma).unsqueeze(-1)
    wc, wm = soft_mining_weights(q, d0, gamma, dim=-1)
    torch.testing.assert_close(wc, w_cos)
    torch.testing.assert_close(wm, w_mse)
    torch.testing.assert_close(d.grad, w_cos * dc.grad + w_mse * dm.grad)
    # the loss value is the plain one
    plain = (1 - F.cosine_similarity(q.reshape(2, -1), d0.reshape(2, -1), dim=1)).mean() + ((q - d0) ** 2).mean()
    torch.testing.assert_close(loss.detach(), plain)
    # gamma = 0: no re-weighting
    d2 = d0.clone().requires_grad_(True)
    soft_mining_loss([q], [d2], gamma=0.0, dim=-1).backward()
    torch.testing.assert_close(d2.grad, dc.grad + dm.grad)


def test_dice_loss_values():
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:5, 2:6] = 1
    assert dice_loss(m, m).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(1 - m, m).item() == pytest.approx(1.0, abs=1e-6)
    assert dice_loss(m, m, per_image=True).item() == pytest.approx(0.0, abs=1e-6)
    half = 0.5 * m
    # 1 - 2 * 0.5 S / (0.25 S + S) = 1 - 0.8
    assert dice_loss(half, m).item() == pytest.approx(0.2, abs=1e-6)


# --- eq. 9 -------------------------------------------------------------------------------------
def test_eq9_reconstruction_map_and_combination():
    q = [torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])]  # B=1, N=2 (grid 1x2), C=2
    d = [torch.tensor([[[0.0, 4.0], [1.0, 1.0]]])]
    a = reconstruction_error_map(q, d, (1, 2))
    # token 0: cos distance 1, L2 5 -> 3; token 1: 0
    torch.testing.assert_close(a, torch.tensor([[[[3.0, 0.0]]]]))
    a_rec = torch.rand(2, 1, 4, 4)
    m_pred = torch.rand(2, 1, 16, 16)
    out = combine_anomaly_maps(a_rec, m_pred, (16, 16), sigma=0.0)
    up = F.interpolate(a_rec, size=(16, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, ((up + m_pred) / 2)[:, 0])
    assert combine_anomaly_maps(a_rec, None, (16, 16), sigma=0.0).shape == (2, 16, 16)
    # smoothing is applied to A (linear: equals smoothing both terms)
    from uad.methods.common.scoring import gaussian_blur

    torch.testing.assert_close(combine_anomaly_maps(a_rec, m_pred, (16, 16), 4.0, 5),
                               gaussian_blur((up + m_pred) / 2, 4.0, 5)[:, 0], rtol=1e-5, atol=1e-6)


# --- method ------------------------------------------------------------------------------------
def test_method_stages_modules_and_synthesis_flag():
    m = _method()
    assert m.stages == ("reconstruction", "residual")
    assert set(m.trainable_modules()) == {"bottleneck", "extractor", "decoder", "seg_head"}
    assert m.wants_synthesis("residual") and not m.wants_synthesis("reconstruction")
    assert m.input_spec["crop"] == 56
    m2 = _method(residual_learning=False, use_inp=False)
    assert m2.stages == ("reconstruction",)
    assert set(m2.trainable_modules()) == {"bottleneck", "decoder"}
    out = m2.predict(torch.randn(2, 3, 56, 56))
    assert out.maps.shape == (2, 56, 56) and out.scores.shape == (2,)


def _batch(seed: int, b: int = 4, size: int = 56):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 14:35, 14:35] = 1
    img = img + 3.0 * mask  # a bright "anomaly" square
    return {"image": img, "mask": mask}


def test_residual_stage_stop_gradient():
    torch.manual_seed(0)
    m = _method(**SHALLOW)
    setup = m.configure_optimization("residual", 16)
    recon = dict(m.model.named_parameters())
    before = {k: v.detach().clone() for k, v in recon.items() if not k.startswith("seg_head.")}
    seg_before = {k: v.detach().clone() for k, v in recon.items() if k.startswith("seg_head.")}
    m.train_mode("residual")
    assert not m.model.decoder.training and m.model.seg_head.training
    loss = m.training_step("residual", _batch(0), 0)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for k, p in m.model.named_parameters():
        if not k.startswith("seg_head."):
            assert p.grad is None, k
    for g in setup.optimizer.param_groups:  # the warm-up starts at lr 0: take a real step
        g["lr"] = 1e-3
    setup.optimizer.step()
    for k, v in before.items():
        assert torch.equal(recon[k], v), k
    assert any(not torch.equal(recon[k], v) for k, v in seg_before.items())
    # the residual-stage optimiser holds exactly the seg-head parameters
    opt_ids = {id(p) for g in setup.optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in m.model.seg_head.parameters()}


@pytest.mark.parametrize("over", [
    dict(use_inp=False, soft_mining=False, residual_learning=False),  # Table 9 row 1
    dict(coherence="hard", soft_mining=False),
    dict(coherence="none", num_inp_tokens=3),
])
def test_ablation_switches_train(over):
    m = _method(**SHALLOW, **over)
    m.train_mode("reconstruction")
    loss = m.training_step("reconstruction", _batch(1, b=2), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.model.decoder.parameters())
    if m.model.extractor is not None:
        assert m.model.extractor.tokens.shape[0] == m.cfg.num_inp_tokens
        # the decoder output depends on the INPs: the tokens get a gradient
        assert m.model.extractor.tokens.grad is not None


def test_rl_without_stop_gradient_reaches_reconstruction_model():
    m = _method(**SHALLOW, residual_stop_gradient=False)
    setup = m.configure_optimization("residual", 16)
    m.train_mode("residual")
    assert m.model.decoder.training
    m.training_step("residual", _batch(2, b=2), 0).backward()
    assert m.model.decoder[0].attn.q.weight.grad is not None
    opt_ids = {id(p) for g in setup.optimizer.param_groups for p in g["params"]}
    assert id(m.model.decoder[0].attn.q.weight) in opt_ids


def test_state_round_trip(tmp_path):
    from uad.engine.checkpoint import load_state, save_state

    torch.manual_seed(0)
    m = _method(**SHALLOW)
    with torch.no_grad():  # make the seg head non-trivial
        for p in m.model.seg_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = m.state_dict()
    assert any(k.startswith("seg_head.") for k in state) and any(k.startswith("extractor.tokens") for k in state)
    save_state(tmp_path / "s.safetensors", state, {"method": "inpformer"})
    loaded, _ = load_state(tmp_path / "s.safetensors")
    torch.manual_seed(0)  # same random encoder (not part of the state), different trainable init
    m2 = _method(seed=7, **SHALLOW)
    m2.load_state_dict(loaded)
    x = torch.randn(2, 3, 56, 56)
    a, b = m.predict(x), m2.predict(x)
    torch.testing.assert_close(a.maps, b.maps)
    torch.testing.assert_close(a.scores, b.scores)


def test_short_training_decreases_both_losses():
    from uad.engine import EngineConfig, Trainer

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.items = [_batch(i, b=1) for i in range(8)]

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[0] for k, v in self.items[i].items()}

    m = _method(**SHALLOW)
    data = Data()

    def run(stage: str, iters: int) -> list[float]:
        trainer = Trainer(EngineConfig(device="cpu", iterations=iters, batch_size=4, progress=False, log_every=1))
        return [loss for _, loss in trainer.fit(m, stage, data)["history"]]

    rec = run("reconstruction", 24)
    assert sum(rec[-4:]) / 4 < 0.9 * sum(rec[:4]) / 4, rec
    frozen = {k: v.detach().clone() for k, v in m.model.decoder.state_dict().items()}
    res = run("residual", 24)
    assert sum(res[-4:]) / 4 < sum(res[:4]) / 4, res
    for k, v in m.model.decoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
