"""Shared ViT-reconstruction pieces (uad.methods.common) against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uad.methods.common import (
    BottleneckMLP,
    DecoderBlock,
    LinearAttention,
    SoftmaxAttention,
    StableAdamW,
    WarmCosineSchedule,
    cosine_distance_maps,
    fuse_groups,
    gaussian_kernel1d,
    global_cosine_hm_loss,
    global_cosine_loss,
    hard_mining_ratio,
    make_groups,
    resolve_groups,
    topk_mean_score,
    upsample_and_smooth,
)


def _heads(attn, x):
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def test_linear_attention_matches_explicit_matrix():
    torch.manual_seed(0)
    attn = LinearAttention(16, num_heads=4).eval()
    x = torch.randn(2, 7, 16)
    q, k, v = _heads(attn, x)
    # explicit (N x N) matrix phi(q) phi(k)^T, each row normalised to sum 1, times V
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    a = a / a.sum(dim=-1, keepdim=True)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_softmax_attention_matches_manual_formula():
    torch.manual_seed(0)
    attn = SoftmaxAttention(16, num_heads=2).eval()
    x = torch.randn(3, 5, 16)
    q, k, v = _heads(attn, x)
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_softmax_attention_weights_come_from_the_same_projections():
    """``need_weights``: the explicit matrix and an output equal to the fused kernel's, through the
    one block implementation (AGPNet's mean teacher reads its attention this way)."""
    torch.manual_seed(0)
    blk = DecoderBlock(16, 2, attn="softmax").eval()
    x = torch.randn(3, 5, 16)
    y, a = blk(x, need_weights=True)
    torch.testing.assert_close(y, blk(x), rtol=1e-5, atol=1e-6)
    q, k, _ = _heads(blk.attn, blk.norm1(x))
    torch.testing.assert_close(a, torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1), rtol=1e-5, atol=1e-6)


def test_decoder_block_is_prenorm_residual_and_eps():
    torch.manual_seed(0)
    blk = DecoderBlock(16, 4, attn="softmax").eval()
    assert blk.norm1.eps == 1e-8 and blk.norm2.eps == 1e-8
    x = torch.randn(2, 6, 16)
    y = x + blk.attn(blk.norm1(x))
    y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(blk(x), y)
    assert isinstance(DecoderBlock(16, 4).attn, LinearAttention)
    with pytest.raises(ValueError):
        DecoderBlock(16, 4, attn="nope")


def test_bottleneck_dropout_on_input_and_identity_in_eval():
    torch.manual_seed(0)
    bn = BottleneckMLP(8, drop=0.5)
    x = torch.randn(4, 3, 8)
    bn.eval()
    ref = bn.fc2(F.gelu(bn.fc1(x)))
    torch.testing.assert_close(bn(x), ref)
    bn.train()
    seen = {}
    bn.fc1.register_forward_pre_hook(lambda mod, inp: seen.update(fc1_in=inp[0].detach()))
    bn.fc2.register_forward_pre_hook(lambda mod, inp: seen.update(fc2_in=inp[0].detach()))
    bn(x)
    # dropout acts on the bottleneck input itself (official bMlp) and after the activation
    kept = seen["fc1_in"] != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(seen["fc1_in"][kept], (x / 0.5)[kept])
    assert (seen["fc2_in"] == 0).float().mean() > 0.3


def test_groups():
    assert make_groups(8, 1) == [list(range(8))]
    assert make_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_groups(8, 8) == [[i] for i in range(8)]
    assert resolve_groups("dense", 8) == make_groups(8, 8)
    assert resolve_groups([[0, 2], [1]], 3) == [[0, 2], [1]]
    with pytest.raises(ValueError):
        resolve_groups([[0, 9]], 8)
    feats = [torch.full((1, 2, 3), float(i)) for i in range(8)]
    one = fuse_groups(feats, make_groups(8, 1))
    two = fuse_groups(feats, make_groups(8, 2))
    dense = fuse_groups(feats, make_groups(8, 8))
    assert len(one) == 1 and torch.all(one[0] == 3.5)
    assert len(two) == 2 and torch.all(two[0] == 1.5) and torch.all(two[1] == 5.5)
    assert len(dense) == 8 and all(torch.all(d == i) for i, d in enumerate(dense))


def test_topk_mean_score_hand_made_map():
    m = torch.zeros(2, 10, 20)  # 200 pixels -> top 1% = 2 pixels
    m[0, 0, 0], m[0, 3, 3], m[0, 5, 5] = 10.0, 6.0, 4.0
    m[1] = 1.0
    torch.testing.assert_close(topk_mean_score(m, 0.01), torch.tensor([8.0, 1.0]))
    torch.testing.assert_close(topk_mean_score(m, 0.0), torch.tensor([10.0, 1.0]))


def test_cosine_distance_maps_and_smoothing():
    torch.manual_seed(0)
    e = [torch.randn(2, 12, 5), torch.randn(2, 12, 5)]
    d = [torch.randn(2, 12, 5), torch.randn(2, 12, 5)]
    m = cosine_distance_maps(e, d, (3, 4))
    assert m.shape == (2, 1, 3, 4)
    ref = ((1 - F.cosine_similarity(e[0], d[0], dim=-1)) + (1 - F.cosine_similarity(e[1], d[1], dim=-1))) / 2
    torch.testing.assert_close(m.reshape(2, 12), ref)
    k = gaussian_kernel1d(4.0, 5)
    assert k.numel() == 5 and abs(float(k.sum()) - 1) < 1e-6
    assert gaussian_kernel1d(4.0, None).numel() == 2 * int(4 * 4.0 + 0.5) + 1
    out = upsample_and_smooth(m, 16, sigma=4.0)
    assert out.shape == (2, 16, 16) and out.dtype == torch.float32
    # separable blur equals the 2-D 5x5 kernel (outer product), zero padded
    up = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=True)
    ref2 = F.conv2d(up, torch.outer(k, k).view(1, 1, 5, 5), padding=2)[:, 0]
    torch.testing.assert_close(out, ref2, rtol=1e-5, atol=1e-6)


def test_hard_mining_loss_shrinks_exactly_the_best_points():
    torch.manual_seed(0)
    b, n, c = 2, 10, 4  # 20 points; k = 0.5 -> the 10 lowest-distance points are shrunk
    enc = torch.randn(b, n, c)
    dec0 = torch.randn(b, n, c)

    d_plain = dec0.clone().requires_grad_(True)
    global_cosine_loss([enc], [d_plain]).backward()
    d_hm = dec0.clone().requires_grad_(True)
    loss = global_cosine_hm_loss([enc], [d_hm], k_ratio=0.5, shrink=0.1)
    loss.backward()
    # same loss value as the plain global cosine loss
    torch.testing.assert_close(loss, global_cosine_loss([enc], [dec0]))

    dist = (1 - F.cosine_similarity(enc, dec0, dim=-1)).reshape(-1)
    best = torch.zeros(b * n, dtype=torch.bool)
    best[dist.argsort()[:10]] = True
    ratio = (d_hm.grad / d_plain.grad).reshape(b * n, c)
    torch.testing.assert_close(ratio[best], torch.full((10, c), 0.1))
    torch.testing.assert_close(ratio[~best], torch.ones(10, c))

    # k = 0 shrinks nothing
    d0 = dec0.clone().requires_grad_(True)
    global_cosine_hm_loss([enc], [d0], k_ratio=0.0).backward()
    torch.testing.assert_close(d0.grad, d_plain.grad)


def test_hard_mining_ratio_ramp():
    assert hard_mining_ratio(0) == 0.0
    assert hard_mining_ratio(500) == pytest.approx(0.45)
    assert hard_mining_ratio(1000) == pytest.approx(0.9)
    assert hard_mining_ratio(5000) == pytest.approx(0.9)
    assert hard_mining_ratio(250, warmup_iters=500) == pytest.approx(0.45)


def _reference_stable_adamw_step(p, g, m, v, vmax, step, lr, b1, b2, wd, eps):
    """Direct per-tensor StableAdamW + AMSGrad step (Wortsman et al. 2023 update clipping)."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vmax = torch.maximum(vmax, v)
    denom = vmax.sqrt() / math.sqrt(1 - b2**step) + eps
    rms = torch.sqrt(torch.mean((g / denom) ** 2))
    clip = max(1.0, float(rms))
    p = p - lr / (1 - b1**step) / clip * m / denom
    return p, m, v, vmax


def test_stable_adamw_matches_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    bias = torch.nn.Parameter(torch.randn(3))
    opt = StableAdamW([w, bias], lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-10, amsgrad=True)
    ref = {id(t): [t.detach().clone(), torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t)] for t in (w, bias)}
    for step in (1, 2, 3):
        grads = {id(w): torch.randn(5, 3) * step, id(bias): torch.randn(3)}
        for t in (w, bias):
            t.grad = grads[id(t)].clone()
        opt.step()
        for t in (w, bias):
            p, m, v, vmax = ref[id(t)]
            ref[id(t)] = list(_reference_stable_adamw_step(p, grads[id(t)], m, v, vmax, step, 2e-3, 0.9, 0.999, 1e-4, 1e-10))
            torch.testing.assert_close(t.detach(), ref[id(t)][0], rtol=1e-6, atol=1e-7)
    st = opt.state[w]
    assert isinstance(st["step"], torch.Tensor) and float(st["step"]) == 3
    assert all(isinstance(val, torch.Tensor) for val in st.values())
    # round trip through state_dict keeps training identical
    opt2 = StableAdamW([torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(bias.detach().clone())], lr=2e-3)
    opt2.load_state_dict(opt.state_dict())
    assert float(opt2.state[opt2.param_groups[0]["params"][0]]["step"]) == 3


def test_warm_cosine_schedule_values_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = StableAdamW([p], lr=2e-3)
    sched = WarmCosineSchedule(opt, base_lr=2e-3, final_lr=2e-4, total_iters=1000, warmup_iters=100)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(1001):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0
    assert lrs[50] == pytest.approx(2e-3 * 50 / 99)
    assert lrs[99] == pytest.approx(2e-3) and lrs[100] == pytest.approx(2e-3)
    assert lrs[550] == pytest.approx(2e-4 + 0.5 * 1.8e-3)  # half-way through the cosine
    assert lrs[999] == pytest.approx(2e-4, abs=1e-6) and lrs[1000] == 2e-4 and lrs[1001] == 2e-4
    state = sched.state_dict()
    opt2 = StableAdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched2 = WarmCosineSchedule(opt2, base_lr=2e-3, final_lr=2e-4, total_iters=1000, warmup_iters=100)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch
