"""Backbones: ViT token API, CNN stage maps, and the weight-resolution order (uad.backbones)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from uad.backbones import (
    ALIASES,
    WeightsLoadError,
    WeightsUnavailableError,
    build_backbone,
    canonical_name,
    list_layers,
    load_timm_model,
    resolve_weights,
)

class NotATensor:
    """A pickled object torch.load(weights_only=True) must refuse."""


TINY_VIT = "test_vit"  # timm test model, 0.37 M parameters,: the stand-in for hub / file weights


@pytest.fixture(scope="module")
def vit_s_reg():
    torch.manual_seed(0)
    return build_backbone("dinov2_vits14_reg", weights="random", layers=[2, 5], need_attention=True)


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """A random tiny ViT's state dict saved as safetensors, plus the model itself."""
    torch.manual_seed(1)
    import timm

    model = timm.create_model(TINY_VIT, pretrained=False)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return path, sd


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UAD_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path


# ------------------------------------------------------------------------------------------ ViT
def _timm_intermediates(b, x, **kw):
    """timm's ``forward_intermediates`` of the wrapped model with the backbone's DINOv2 position
    embedding (checked against its formula in its own test)."""
    m = b.model
    grid = (x.shape[-2] // b.patch_size, x.shape[-1] // b.patch_size)
    m._pos_embed = lambda h: b._dinov2_embed(h, grid)
    try:
        return m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, **kw)
    finally:
        del m._pos_embed


def test_aliases_resolve():
    assert canonical_name("dinov2_vitb14_reg") == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert canonical_name("dino_vitb8") == "vit_base_patch8_224.dino"
    assert set(ALIASES) >= {"dinov2_vits14_reg", "dinov2_vitl14_reg", "dino_vits16", "dino_vitb16"}
    with pytest.raises(ValueError, match="unknown backbone"):
        canonical_name("not_a_model_xyz")


@pytest.mark.parametrize("size", [56, 112])
def test_vit_tokens_drop_prefix(vit_s_reg, size):
    b = vit_s_reg
    assert b.kind == "vit" and b.embed_dim == 384 and b.num_layers == 12 and b.patch_size == 14
    assert b.num_prefix_tokens == 5  # class + 4 registers
    assert b.weights_info.source == "random"
    assert all(not p.requires_grad for p in b.parameters()) and not b.training
    out = b(torch.randn(2, 3, size, size))
    g = size // 14
    assert out.grid == (g, g) and out.layers == (2, 5)
    assert [tuple(t.shape) for t in out.tokens] == [(2, g * g, 384)] * 2
    assert [tuple(t.shape) for t in out.prefix] == [(2, 5, 384)] * 2
    assert out.token_maps()[0].shape == (2, 384, g, g)


def test_vit_tokens_match_timm_and_stop_early(vit_s_reg):
    b, m = vit_s_reg, vit_s_reg.model
    x = torch.randn(1, 3, 56, 56)
    called = []
    hooks = [blk.mlp.register_forward_hook(lambda mod, i, o, k=k: called.append(k)) for k, blk in enumerate(m.blocks)]
    try:
        out = b(x, layers=[1, 3])  # per-call layer override
    finally:
        for h in hooks:
            h.remove()
    assert called == [0, 1, 2, 3]  # nothing deeper than the last requested block ran
    # oracle: timm's own full-depth intermediates, with DINOv2's position embedding (tested below)
    ref = _timm_intermediates(b, x, indices=[1, 3], return_prefix_tokens=True)
    for (spatial, prefix), tok, pre in zip(ref, out.tokens, out.prefix):
        torch.testing.assert_close(tok, spatial, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pre, prefix, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("crop", [56, 392])
def test_dinov2_position_embedding_is_interpolated_as_dinov2_does(crop):
    """DINOv2's interpolate_pos_encoding: the native 37 x 37 embedding, bicubic with scale factor
    (g + 0.1) / 37 and no antialias, at every forward; the block input is patch tokens + that
    embedding after the class and register tokens."""
    import torch.nn.functional as F

    from uad.backbones import dinov2_patch_pos_embed

    torch.manual_seed(0)
    b = build_backbone("dinov2_vits14_reg", weights="random", layers=[0], img_size=crop)
    m = b.model
    assert m.pos_embed.shape[1] == 37 * 37  # the native grid is kept, not resampled at load
    g = crop // 14
    native = m.pos_embed.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    direct = F.interpolate(native, scale_factor=((g + 0.1) / 37, (g + 0.1) / 37), mode="bicubic", antialias=False)
    direct = direct.permute(0, 2, 3, 1).reshape(1, g * g, -1)
    torch.testing.assert_close(dinov2_patch_pos_embed(m.pos_embed, (g, g)), direct, atol=0, rtol=0)
    # timm's one-time antialiased resampling is measurably different (what this replaces)
    timm_pe = F.interpolate(native, size=(g, g), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, g * g, -1)
    assert (timm_pe - direct).abs().max() > 1e-4
    # the first block sees cls, 4 registers, then patch tokens + the DINOv2 embedding
    x = torch.randn(1, 3, crop, crop)
    seq = m.patch_embed(x).reshape(1, g * g, -1) + direct
    seq = torch.cat([m.cls_token, m.reg_token, seq], dim=1)
    torch.testing.assert_close(b(x).tokens[0], m.blocks[0](seq)[:, 5:], atol=1e-5, rtol=1e-5)


def test_vit_attention_maps(vit_s_reg):
    x = torch.randn(2, 3, 56, 56)
    out = vit_s_reg(x)
    n_all = 5 + 16
    assert [tuple(a.shape) for a in out.attn] == [(2, 6, n_all, n_all)] * 2
    for a in out.attn:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 6, n_all), atol=1e-5, rtol=0)
    # the explicit-attention block output equals timm's fused block output
    fused = _timm_intermediates(vit_s_reg, x, indices=[5])[0]
    torch.testing.assert_close(out.tokens[1], fused, atol=1e-4, rtol=1e-4)


def test_vit_prefix_attention_rows_and_per_call_modes(vit_s_reg):
    """``attention="prefix"``: only the class / register rows, from the same qkv, with the fused
    kernel for the block output; ``"none"`` skips the maps of a model built with them."""
    x = torch.randn(2, 3, 56, 56)
    full, rows, none = vit_s_reg(x), vit_s_reg(x, attention="prefix"), vit_s_reg(x, attention="none")
    assert [tuple(a.shape) for a in rows.attn] == [(2, 6, 5, 21)] * 2 and none.attn is None
    for f, r in zip(full.attn, rows.attn):
        torch.testing.assert_close(r, f[:, :, :5], atol=1e-6, rtol=1e-5)
    for f, r, n in zip(full.tokens, rows.tokens, none.tokens):
        torch.testing.assert_close(r, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(n, f, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention must be"):
        vit_s_reg(x, attention="cls")


def test_layer_out_of_range_is_clear(vit_s_reg):
    with pytest.raises(ValueError, match="12 blocks"):
        vit_s_reg(torch.randn(1, 3, 28, 28), layers=[12])
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        vit_s_reg(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="feature stages"):
        build_backbone("resnet18", weights="random", layers=(2, 7))


# ------------------------------------------------------------------------------------------ CNN
def test_cnn_feature_shapes():
    b = build_backbone("resnet18", weights="random", layers=(2, 3))
    assert b.kind == "cnn" and b.channels == [128, 256] and b.patch_size == 8
    assert [d["module"] for d in b.list_layers()] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert not hasattr(b.model, "layer4")  # deeper stages pruned by features_only
    out = b(torch.randn(2, 3, 64, 64))
    assert out.tokens is None and [tuple(m.shape) for m in out.maps] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    assert list_layers("tf_efficientnet_lite0")[3]["channels"] == 112


def test_bundled_lite0_backbone(offline_env):
    b = build_backbone("tf_efficientnet_lite0", layers=(2, 3))  # auto: hub unavailable -> bundled
    assert b.weights_info.source == "bundled" and "hub" in b.weights_info.detail
    assert b.channels == [40, 112] and b.mean == (0.5, 0.5, 0.5)
    out = b(torch.randn(1, 3, 96, 96))
    assert [tuple(m.shape) for m in out.maps] == [(1, 40, 12, 12), (1, 112, 6, 6)]


def test_no_hub_probe_for_bundled_or_random_weights_and_one_probe_per_process(monkeypatch, tmp_path):
    """An offline machine (no HF_HUB_OFFLINE set) is never probed for a model with bundled weights
    or for random weights; for other models a failed probe is not repeated by later builds."""
    import uad.backbones.weights as w

    calls = []

    def fake_probe(url, timeout):
        calls.append(url)
        return False, "no route to host (test)"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("UAD_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(w, "_probe", fake_probe)
    monkeypatch.setattr(w, "_PROBES", {})
    monkeypatch.setattr(w, "_is_offline", lambda: False)  # a machine that does not know it is offline
    assert build_backbone("tf_efficientnet_lite0", layers=(2,)).weights_info.source == "bundled"
    assert build_backbone("tf_efficientnet_lite0", weights="random", layers=(2,)).weights_info.source == "random"
    assert calls == []
    for _ in range(3):  # e.g. train, predict, ... nodes of one run
        _, info = load_timm_model(TINY_VIT, allow_random=True)
        assert info.source == "random"
    assert len(calls) == 1


# -------------------------------------------------------------------------------------- weights
def test_explicit_safetensors_file(tiny_state):
    path, sd = tiny_state
    model, info = load_timm_model(TINY_VIT, weights=str(path))
    assert info.source == "file" and info.path == str(path)
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    b = build_backbone(TINY_VIT, weights=path, layers=[1])
    assert b.weights_info.source == "file" and b.embed_dim == 64
    torch.testing.assert_close(b.model.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])


def test_explicit_pth_file_weights_only(tiny_state, tmp_path):
    _, sd = tiny_state
    good = tmp_path / "tiny.pth"
    torch.save({"state_dict": sd}, good)  # a wrapped checkpoint is unwrapped
    _, info = load_timm_model(TINY_VIT, weights=str(good))
    assert info.source == "file"

    bad = tmp_path / "evil.pth"  # an arbitrary pickled object must be refused by weights_only=True
    torch.save({"state_dict": sd, "obj": NotATensor()}, bad)
    with pytest.raises(WeightsLoadError, match="weights_only"):
        load_timm_model(TINY_VIT, weights=str(bad))


def test_explicit_file_strict_errors(tiny_state, tmp_path):
    _, sd = tiny_state
    missing = dict(sd)
    missing.pop("blocks.3.norm1.weight")
    p1 = tmp_path / "missing.safetensors"
    save_file(missing, str(p1))
    with pytest.raises(WeightsLoadError, match=r"Missing key.*blocks\.3\.norm1\.weight"):
        load_timm_model(TINY_VIT, weights=str(p1))

    wrong = dict(sd)
    wrong["blocks.0.mlp.fc1.bias"] = torch.zeros(5)
    p2 = tmp_path / "wrong.safetensors"
    save_file(wrong, str(p2))
    with pytest.raises(WeightsLoadError, match="size mismatch"):
        load_timm_model(TINY_VIT, weights=str(p2))

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsLoadError, match="not a readable safetensors"):
        load_timm_model(TINY_VIT, weights=str(junk))

    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_timm_model(TINY_VIT, weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="expected a file path"):
        load_timm_model(TINY_VIT, weights="imagenet")


def test_weights_dir_is_searched_first(tiny_state, offline_env):
    path, _ = tiny_state
    d = offline_env / "weights"
    d.mkdir()
    (d / f"{TINY_VIT}.safetensors").write_bytes(path.read_bytes())
    _, info = load_timm_model(TINY_VIT)
    assert info.source == "file" and info.path.startswith(str(d))


def test_random_is_flagged_and_never_silent(offline_env, caplog):
    with pytest.raises(WeightsUnavailableError) as e:
        load_timm_model(TINY_VIT)  # auto, nothing available, allow_random False
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "allow_random: true" in msg and "weights: /path/to/" in msg
    assert str(offline_env / "weights") in msg
    with caplog.at_level(logging.WARNING, logger="uad.backbones"):
        _, info = load_timm_model(TINY_VIT, allow_random=True)
    assert info.source == "random" and "RANDOM WEIGHTS" in caplog.text
    assert resolve_weights(TINY_VIT, allow_random=True).source == "random"
    with pytest.raises(WeightsUnavailableError, match="no bundled weights"):
        load_timm_model(TINY_VIT, weights="bundled")
    assert resolve_weights("tf_efficientnet_lite0").source == "bundled"


def test_hub_path_offline_fails_fast_and_uses_cache(tiny_state, tmp_path):
    """Real process with HF_HUB_OFFLINE=1 and an empty HF_HOME: the hub fails fast and falls
    through; then a file placed in the hub cache layout is loaded by timm's pretrained path."""
    path, _ = tiny_state
    script = textwrap.dedent(
        f"""
        import json, os, time, timm, torch
        from pathlib import Path
        from uad.backbones import load_timm_model, WeightsUnavailableError
        res = {{}}
        t = time.time()
        try:
            load_timm_model("{TINY_VIT}")
            res["err"] = None
        except WeightsUnavailableError as e:
            res["err"] = str(e)
        res["fail_s"] = time.time() - t
        _, info = load_timm_model("tf_efficientnet_lite0")
        res["lite0"] = info.source
        # populate the hub cache exactly as huggingface_hub lays it out
        cfg = timm.models.get_pretrained_cfg("{TINY_VIT}")
        repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
        rev = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(rev)
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "model.safetensors").write_bytes(Path(r"{path}").read_bytes())
        m, info = load_timm_model("{TINY_VIT}")
        res["cached"] = [info.source, info.path]
        res["w"] = m.state_dict()["blocks.0.attn.qkv.weight"][0, :3].tolist()
        print("RESULT" + json.dumps(res))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), UAD_WEIGHTS_DIR=str(tmp_path / "none"),
               TORCH_HOME=str(tmp_path / "torch"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["err"] and "HF_HUB_OFFLINE" in res["err"] and res["fail_s"] < 5
    assert res["lite0"] == "bundled"
    assert res["cached"][0] == "hub_cache" and res["cached"][1].endswith("model.safetensors")
    from safetensors.torch import load_file

    expect = load_file(str(path))["blocks.0.attn.qkv.weight"][0, :3].tolist()
    assert res["w"] == pytest.approx(expect)
    assert time.time() - t0 < 60


# ------------------------------------------------------------------------------- a real photo
def test_bundled_lite0_classifies_real_photos():
    """The bundled weights, mapped key-for-key, are real ImageNet weights: photos shipped with
    matplotlib and scikit-learn are classified correctly with the model's own preprocessing."""
    import importlib.util

    import matplotlib
    import timm
    from PIL import Image

    model, info = load_timm_model("tf_efficientnet_lite0", weights="bundled")
    assert info.source == "bundled"
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    tf = timm.data.create_transform(**cfg)
    sk_images = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "images"
    paths = [
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",  # Grace Hopper in uniform
        sk_images / "china.jpg",  # a Chinese palace
        sk_images / "flower.jpg",  # a daisy
    ]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        top = model(x).softmax(-1).topk(5).indices.tolist()
    # 652 military uniform; its neighbours: 400 academic gown, 667 mortarboard, 457 bow tie,
    # 906 Windsor tie, 887 vestment
    assert 652 in top[0] and top[0][0] in {652, 400, 667}
    assert set(top[0]) <= {652, 400, 667, 457, 906, 887, 834, 617, 869}
    assert top[1][0] == 698  # palace
    assert top[2][0] == 985  # daisy


def test_random_initialisation_is_the_same_network_every_time():
    """A frozen random encoder is not saved with the learned state, so training and prediction
    must rebuild exactly the same one."""
    import torch

    from uad.backbones import build_backbone

    torch.manual_seed(123)
    a = build_backbone("dinov2_vits14_reg", weights="random", allow_random=True, layers=[0])
    torch.manual_seed(456)
    b = build_backbone("dinov2_vits14_reg", weights="random", allow_random=True, layers=[0])
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka
