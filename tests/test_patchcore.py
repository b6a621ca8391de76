"""PatchCore (Roth et al., CVPR 2022): coreset, k-NN, maps, fit/predict, state round trip."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from uad.methods.patchcore import PatchCoreConfig, greedy_coreset, nearest_neighbors, reweighted_image_score, smooth_maps
from uad.methods.patchcore.model import aggregate_patches
from uad.methods.registry import build_method

SMALL = dict(backbone="tf_efficientnet_lite0", weights="bundled", layers=(2, 3), target_dim=64, resize=64, crop=64,
             coreset_ratio=0.25, projection_dim=16)
NO_PROGRESS = SimpleNamespace(config=SimpleNamespace(progress=False))


@pytest.fixture(scope="module")
def method():
    return build_method("patchcore", SMALL)


def _normalise(x: torch.Tensor, m) -> torch.Tensor:
    spec = m.input_spec
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _textures(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Smooth, regular stripes with mild noise in [0, 1]: the 'normal' class."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 0.5 + 0.2 * torch.sin(xx.float() / 3.0)  # H, W
    img = base.expand(n, 3, size, size).clone()
    return (img + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------- config
def test_config_defaults_and_unknown_keys():
    cfg = PatchCoreConfig()
    assert (cfg.backbone, cfg.layers, cfg.target_dim, cfg.coreset_ratio, cfg.projection_dim) == (
        "wide_resnet50_2", (2, 3), 1024, 0.1, 128)
    assert (cfg.resize, cfg.crop, cfg.sigma, cfg.neighbourhood) == (256, 224, 4.0, 3)
    with pytest.raises(ValueError, match="valid parameters: .*coreset_ratio"):
        PatchCoreConfig.from_params({"coreset": 0.1})
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreConfig.from_params({"coreset_ratio": 0})
    assert PatchCoreConfig.from_params({"layers": [1, 2]}).layers == (1, 2)


# ----------------------------------------------------------------------------------- coreset
def test_greedy_coreset_is_k_center_greedy():
    """Oracle: every pick is the point farthest from the picks before it (no projection)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    sel = greedy_coreset(x, 20, projection_dim=0, seed=3).tolist()
    assert len(set(sel)) == 20
    for i in range(1, 20):
        dmin = torch.cdist(x, x[sel[:i]]).min(dim=1).values
        assert dmin[sel[i]] == pytest.approx(dmin.max().item(), rel=1e-4)


def test_greedy_coreset_picks_far_apart_clusters():
    """Five tight, far-apart clusters: five picks cover all five (also through a JL projection)."""
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(5, 64) * 50.0
    x = (centres.repeat_interleave(40, 0) + 0.1 * torch.randn(200, 64, generator=g))
    cluster = torch.arange(5).repeat_interleave(40)
    for proj in (0, 16):
        sel = greedy_coreset(x, 5, projection_dim=proj, seed=7)
        assert sorted(cluster[sel].tolist()) == [0, 1, 2, 3, 4]
    # 1-D toy with a known answer: whatever the start, the outlier 10 is the first or second pick
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    for seed in range(6):
        assert 4 in greedy_coreset(line, 2, projection_dim=0, seed=seed).tolist()


@pytest.mark.parametrize("case", ["blobs", "uniform", "duplicates", "small_blocks"])
def test_lazy_coreset_selects_the_dense_paths_indices(case):
    """The CPU path (lazy, blocked, triangle-inequality skips) returns exactly the indices of the
    dense one-product-per-step path for the same seed: on clustered and uniform data, with exact
    duplicates (ties go to the first index), and with blocks small enough that most are skipped."""
    import uad.methods.patchcore.model as M

    g = torch.Generator().manual_seed({"blobs": 0, "uniform": 1, "duplicates": 2, "small_blocks": 3}[case])
    if case == "uniform":
        x = torch.rand(6000, 96, generator=g)
    else:
        centres = torch.randn(40, 96, generator=g) * 3
        x = centres[torch.randint(40, (6000,), generator=g)] + torch.randn(6000, 96, generator=g)
    if case == "duplicates":
        x[3000:3600] = x[:600]  # identical rows: equal running minima, the first index must win
    block = 64 if case == "small_blocks" else M._LAZY_BLOCK
    z = M.random_projection(x, 32, seed=5)
    dense = M._greedy_dense(z, 600, start=11)
    lazy = M._greedy_lazy(z, 600, start=11, block=block)
    assert torch.equal(dense, lazy), f"first difference at step {int((dense != lazy).nonzero()[0])}"
    # the public function picks the lazy path on CPU and the dense one when asked
    assert torch.equal(greedy_coreset(x, 600, 32, seed=5), greedy_coreset(x, 600, 32, seed=5, pruned=False))


def test_lazy_coreset_check_fails_on_a_wrong_selection():
    """The equality above can fail: a lazy path that skips one centre too many selects otherwise."""
    import uad.methods.patchcore.model as M

    g = torch.Generator().manual_seed(4)
    z = M.random_projection(torch.randn(3000, 64, generator=g), 32, seed=1)
    old = M._SKIP_SLACK
    try:
        M._SKIP_SLACK = -10.0  # skip centres that can win
        wrong = M._greedy_lazy(z, 300, start=3, block=64)
    finally:
        M._SKIP_SLACK = old
    assert not torch.equal(wrong, M._greedy_dense(z, 300, start=3))


# ----------------------------------------------------------------------------------- k-NN / maps
def test_nearest_neighbors_chunked_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randn(37, 5, generator=g), torch.randn(53, 5, generator=g)
    d, i = nearest_neighbors(q, bank, k=3, chunk_size=8)
    ref_d, ref_i = torch.cdist(q, bank).topk(3, dim=1, largest=False)
    torch.testing.assert_close(d, ref_d)
    assert torch.equal(i, ref_i)


def test_reweighting_formula():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    feats = torch.tensor([[[0.5, 0.0], [4.0, 4.0]]])  # one image, two patches
    d, i = nearest_neighbors(feats[0], bank, k=1)
    scores = d[:, 0][None]
    s = reweighted_image_score(feats, scores, i[:, 0][None], bank, b=2)
    # max patch (4, 4) -> m* = (5, 5); N_2(m*) = {(5, 5), (0, 2)} (distance sqrt(34) < sqrt(41))
    m_test = torch.tensor([4.0, 4.0])
    dist = torch.stack([torch.dist(m_test, bank[3]), torch.dist(m_test, bank[2])])
    expect = (1 - torch.exp(dist[0]) / torch.exp(dist).sum()) * dist[0]
    assert s.item() == pytest.approx(expect.item(), rel=1e-5)


def test_smooth_maps_match_scipy():
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(4)
    m = torch.rand(2, 40, 40, generator=g)
    out = smooth_maps(m, 40, sigma=4.0)  # same size: only the blur acts
    ref = np.stack([gaussian_filter(a, sigma=4.0, mode="reflect") for a in m.numpy().astype(np.float64)])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_aggregate_patches_shapes_and_pooling():
    a, b = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)
    f = aggregate_patches([a, b], neighbourhood=3, target_dim=4)
    assert f.shape == (2, 4, 8, 8)
    # target_dim == total channels: plain concatenation of the pooled maps
    f16 = aggregate_patches([a, b], neighbourhood=1, target_dim=16)
    torch.testing.assert_close(f16[:, :6], a)


# ----------------------------------------------------------------------------------- method
def test_fit_predict_state_roundtrip(method, tmp_path):
    m = method
    assert m.stages == ("fit",) and m.uses_feature_cache()
    assert m.input_spec == {"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    tags = m.tags()
    assert tags["backbone"] == "tf_efficientnet_lite0" and tags["weights_source"] == "bundled"
    g = torch.Generator().manual_seed(5)
    train = torch.randn(6, 3, 64, 64, generator=g)
    loader = [{"image": train[:4]}, {"image": train[4:]}]
    info = m.fit_stage("fit", loader, NO_PROGRESS)
    assert info["patches"] == 6 * 8 * 8 and m.memory_bank.shape == (96, 64)
    # the same bank from cached features (the `features` pipeline)
    fresh = build_method("patchcore", SMALL)
    fresh.fit_from_features(torch.cat([m.features(train[:4]), m.features(train[4:])]))
    torch.testing.assert_close(fresh.memory_bank, m.memory_bank)

    test = torch.randn(3, 3, 64, 64, generator=g)
    pred = m.predict(test)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 64, 64)
    assert pred.scores.dtype == torch.float32 and torch.isfinite(pred.maps).all()
    assert (pred.scores > 0).all()

    state = m.state_dict()
    assert list(state) == ["extra.memory_bank"]
    save_file(state, str(tmp_path / "pc.safetensors"))
    fresh.memory_bank = torch.empty(0, 64)
    fresh.load_state_dict(load_file(str(tmp_path / "pc.safetensors")))
    pred2 = fresh.predict(test)
    torch.testing.assert_close(pred2.scores, pred.scores)
    torch.testing.assert_close(pred2.maps, pred.maps)
    with pytest.raises(KeyError):
        fresh.load_state_dict({"extra.other": torch.zeros(1)})


def test_detects_obvious_anomaly(method):
    m = method
    m.cfg.coreset_ratio, m.cfg.reweight = 0.5, False
    m.fit_stage("fit", [{"image": _normalise(_textures(4, 0), m)}], NO_PROGRESS)
    normal = _textures(3, 1)
    anomalous = _textures(1, 2)
    anomalous[:, :, 24:40, 24:40] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # a red square
    pred = m.predict(_normalise(torch.cat([normal, anomalous]), m))
    assert pred.scores[3] > 1.5 * pred.scores[:3].max()
    peak = pred.maps[3].argmax()
    r, c = divmod(int(peak), 64)
    assert 16 <= r < 48 and 16 <= c < 48  # the map peaks on the square
    inside = pred.maps[3, 24:40, 24:40].mean()
    assert inside > 2 * pred.maps[3, :8, :].mean()
    # eq. 7 re-weighting keeps the ranking on this toy
    m.cfg.reweight = True
    pred_rw = m.predict(_normalise(torch.cat([normal, anomalous]), m))
    assert int(pred_rw.scores.argmax()) == 3
