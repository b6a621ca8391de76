"""The synthesis stage: a spec node between ingestion and training for every method that learns
from pseudo anomalies; the training consumes it, results unchanged, a changed spec retrains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ENGINE = {"device": "cpu", "progress": False, "log_every": 1, "seed": 3}
# residual_iterations=2: with seed 3 the third residual batch holds no pseudo anomaly, its Dice
# loss is exactly 1.0 whatever the textures or the recipe (the numerator is 0), so it told nothing
INP = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
           iterations=2, residual_iterations=2, batch_size=2)
DINO = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
            iterations=1, batch_size=2)
COST = dict(volume_size=16, base_width=8, batch_size=2, iterations=3)


def _make_dtd(root: Path) -> Path:
    for i in range(4):
        d = root / "images" / ("banded" if i % 2 else "dotted")
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"t{i}.jpg", quality=95)
    return root


def _cases(work: Path):
    """Two classes of four normal training images each; synthesis from the fallback textures (self
    + procedural) and from a four-file DTD folder; ``washer`` restricted to its foreground."""
    from uad.data.synthetic import ensure_synthetic_dataset
    from uad.framework.pipelines.ingest.nodes import build_sample_index

    data = work / "parts"
    ensure_synthetic_dataset(data, seed=0, classes=["wood", "washer"], n_train=4, n_test_good=1, n_test_bad_per_defect=1)
    index = build_sample_index({"root": str(data), "layout": "mvtec"})
    train = index[index["split"] == "train"].reset_index(drop=True)
    dtd = _make_dtd(work / "dtd")
    synth_fallback = {"texture_source": "fallback", "self_texture_images": 3, "foreground_classes": ["washer"]}
    synth_dtd = {"texture_source": "dtd", "dtd_root": str(dtd), "foreground_classes": ["washer"]}
    return train, {"fallback": synth_fallback, "dtd": synth_dtd}


def _spec(method, train, synth, engine):
    from uad.framework.pipelines.synthesis.nodes import synthesis_spec

    spec, png, tags = synthesis_spec(method, train, {}, synth, engine, {})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and tags["synthesis_spec"] == spec["digest"][:16]
    return json.loads(json.dumps(spec))  # what the catalog's JSON file gives back


# ------------------------------------------------------------ the path before the synthesis stage
# Before the stage (commit 7e3be83) the training node built its pseudo-anomaly hook itself from the
# raw ``params:synthesis``: self textures drawn from the stage's training rows with the run's seed,
# the method's recipe, one SynthesisAugment per foreground mode. Kept here, straight from the
# synthesizer's parts, as the reference the spec path must equal. The comparison runs both paths in
# this process (same kernels, same threads), so bit-equality is the code's, not the machine's: the
# losses recorded on another CPU once (a golden file) differed from this machine's by up to 7.5e-3
# after three CostFilter-AD steps (ATen's DEFAULT kernels against AVX-512; 6.6e-5 for AVX2), as
# much as reversed DTD textures change them (4.8e-3 to 1.2e-2), so no tolerance could separate a
# changed spec from another machine.
_PRE_STAGE_RECIPE = {"inpformer": "draem", "costfilter": "glad"}  # method.synthesis_recipe(stage) then
_STAGE = {"inpformer": "residual", "costfilter": "filter"}
_OTHER_RECIPE = {"draem": "glad", "glad": "draem"}


def _square(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    out = np.asarray(Image.fromarray(img).resize((resize, resize), Image.BILINEAR))
    top = (resize - crop) // 2
    return out[top:top + crop, top:top + crop]


def _pre_stage_augment(train_df, labelled, synth, seed, crop, resize, recipe, reverse_textures=False):
    """7e3be83's ``build_augment`` (no real anomalies to paste in these cases). ``reverse_textures``
    (a variant the check must catch): the self textures, or the DTD files, in reverse order."""
    from uad.data.augment import EpochForwarding
    from uad.data.images import load_image
    from uad.synthesis import (GLAD_FOREGROUND, PseudoAnomalySynthesizer, SynthesisAugment, SynthesisConfig,
                               make_texture_source)

    assert labelled.empty
    recipe = synth.get("recipe") or recipe
    cfg = SynthesisConfig.for_recipe(recipe, synth.get("config"))
    n_self = min(len(train_df), int(synth.get("self_texture_images", 64)))
    picks = np.random.default_rng(seed).choice(len(train_df), size=n_self, replace=False) if n_self else []
    images = [_square(load_image(train_df.iloc[int(i)]["image_path"]), resize, crop) for i in picks]
    source, _ = make_texture_source(synth.get("texture_source", "fallback"), dtd_root=synth.get("dtd_root"),
                                    images=images[::-1] if reverse_textures else images)
    if reverse_textures and hasattr(source, "files"):
        source.files.reverse()
    objects = set(synth.get("foreground_classes") or [])
    table = GLAD_FOREGROUND if recipe == "glad" else {}
    modes = [table.get(str(c)) or ("auto" if c in objects else "none") for c in train_df["class_name"]]
    generator = PseudoAnomalySynthesizer(source, cfg)
    by_mode = {m: SynthesisAugment(generator, seed, foreground_mode=m) for m in set(modes)}

    class ByMode(EpochForwarding):
        def inner_hooks(self):
            return by_mode.values()

        def __call__(self, image, index):
            return by_mode[modes[index]](image, index)

    return ByMode(), {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The two cases, the stages before the ones compared (INP-Former++ reconstruction, the
    Dinomaly base), and every compared stage trained from the spec the synthesis node wrote."""
    from uad.framework.pipelines.method.nodes import train_stage

    work = tmp_path_factory.mktemp("synthesis_stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        train, synths = _cases(work)
        prior = {"inpformer": train_stage("inpformer", "reconstruction", train, {}, INP, ENGINE, {})[0],
                 "costfilter": train_stage("dinomaly", "train", train, {}, DINO, ENGINE, {})[0]}
        out = {"train": train, "synths": synths, "prior": prior, "specs": {}, "from_spec": {}}
        for name, synth in synths.items():
            for method in _STAGE:
                spec = _spec(method, train, synth, ENGINE)
                assert spec["stages"] == {_STAGE[method]: _PRE_STAGE_RECIPE[method]}
                out["specs"][name, method] = spec
                out["from_spec"][name, method] = _train(method, train, spec, prior[method])
    return out


def _train(method, train, spec, prior):
    """(losses per step, trained tensors) of ``method``'s pseudo-anomaly stage."""
    from uad.framework.pipelines.method.nodes import train_stage

    stage = _STAGE[method]
    if method == "inpformer":
        ck, hist, tags = train_stage(method, stage, train, {}, INP, ENGINE, {}, synthesis=spec, previous=prior)
    else:
        params = {**COST, "base": "dinomaly", "base_params": DINO}
        ck, hist, tags = train_stage(method, stage, train, {}, params, ENGINE, {}, synthesis=spec, base=prior)
    assert tags["synthesis_spec"] == spec["digest"][:16]
    return [r["value"] for r in hist[f"train_loss/{stage}"]], ck["tensors"]


def _variant_recipe(method, variant):
    r = _PRE_STAGE_RECIPE[method]
    return _OTHER_RECIPE[r] if variant == "other_recipe" else r


def _pre_stage_training(trained, name, method, variant, tmp_path):
    """The same stage trained in this process, its pseudo anomalies made the pre-stage way (the
    spec's hook swapped for :func:`_pre_stage_augment` over the raw synthesis parameters)."""
    import uad.synthesis.spec as spec_module

    synth, calls = trained["synths"][name], []

    def pre_stage(spec, stage, train_df, labelled, seed, crop, resize, group=None):
        calls.append(stage)
        return _pre_stage_augment(train_df, labelled, synth, seed, crop, resize, _variant_recipe(method, variant),
                                  reverse_textures=variant == "reversed_textures")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mp.setattr(spec_module, "augment_from_spec", pre_stage)
        got = _train(method, trained["train"], trained["specs"][name, method], trained["prior"][method])
    assert calls == [_STAGE[method]]  # the reference hook was the one trained on
    return got


def _samples_equal(trained, name, method, variant, epochs=4):
    """Whether the spec's hook and the pre-stage one give the same (image, mask, label) for every
    training row over ``epochs`` epochs (the inputs the stage trains on, compared directly)."""
    from uad.data.images import load_image
    from uad.synthesis.spec import augment_from_spec

    train, synth = trained["train"], trained["synths"][name]
    normal, labelled = train[train["label"] == 0], train[train["label"] == 1]
    resize, crop, seed = INP["resize"], INP["crop"], ENGINE["seed"]
    new, _ = augment_from_spec(trained["specs"][name, method], _STAGE[method], normal, labelled, seed, crop, resize)
    old, _ = _pre_stage_augment(normal, labelled, synth, seed, crop, resize, _variant_recipe(method, variant),
                                reverse_textures=variant == "reversed_textures")
    images = [_square(load_image(p), resize, crop) for p in normal["image_path"]]
    for epoch in range(epochs):
        new.epoch = old.epoch = epoch
        for i, img in enumerate(images):
            (a, ma, la), (b, mb, lb) = new(img.copy(), i), old(img.copy(), i)
            if la != lb or not np.array_equal(a, b) or not np.array_equal(np.asarray(ma, bool), np.asarray(mb, bool)):
                return False
    return True


def test_training_from_the_spec_equals_the_pre_stage_training_bit_for_bit(trained, tmp_path):
    """INP-Former++'s residual stage and CostFilter-AD's filter (over Dinomaly), trained from the
    spec the synthesis node wrote, give the same pseudo anomalies, the same loss at every step and
    the same trained tensors as the same stage trained the pre-stage way in this process, for the
    fallback textures and for a DTD folder."""
    for name, method in trained["from_spec"]:
        assert _samples_equal(trained, name, method, "same"), (name, method)
        losses, tensors = trained["from_spec"][name, method]
        ref_losses, ref_tensors = _pre_stage_training(trained, name, method, "same", tmp_path)
        assert [float(x).hex() for x in losses] == [float(x).hex() for x in ref_losses], (name, method)
        assert sorted(tensors) == sorted(ref_tensors)
        assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors), (name, method)


@pytest.mark.parametrize("variant", ["reversed_textures", "other_recipe"])
def test_the_comparison_sees_textures_in_another_order_and_another_recipe(trained, tmp_path, variant):
    """The check above can fail: with the reference's textures reversed (self textures, DTD files)
    or with the other recipe, the pseudo anomalies differ in every case, and each method's losses
    differ in at least one case (reversed fallback textures leave CostFilter-AD's three steps alone:
    no sample of the first two epochs draws a self texture whose position the reversal moves, the
    pseudo anomalies of the later epochs show it); the other recipe changes every INP-Former++ loss
    (no step is a constant)."""
    moved = {}
    for name, method in trained["from_spec"]:
        assert not _samples_equal(trained, name, method, variant), (name, method)
        losses, _ = trained["from_spec"][name, method]
        ref_losses, _ = _pre_stage_training(trained, name, method, variant, tmp_path)
        moved[name, method] = [a != b for a, b in zip(losses, ref_losses)]
        if variant == "other_recipe" and method == "inpformer":
            assert all(moved[name, method]), (name, losses, ref_losses)
    for method in _STAGE:
        assert any(any(moved[name, method]) for name in trained["synths"]), (method, moved)


def test_spec_lists_textures_with_digests_and_a_replaced_dtd_file_retrains(tmp_path, monkeypatch, caplog):
    """Replacing one DTD texture changes the spec; training retrains and its log says the synthesis
    spec changed; a spec left stale (``--from-nodes`` after the change) is an error naming it."""
    from uad.framework.pipelines.method.nodes import train_stage
    from uad.synthesis.spec import SynthesisSpecError

    monkeypatch.chdir(tmp_path)
    train, synths = _cases(tmp_path)
    engine = {**ENGINE, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 1}
    params = {**INP, "residual_iterations": 2}
    synth = synths["dtd"]
    spec = _spec("inpformer", train, synth, engine)
    files = spec["textures"]["dtd"]["files"]
    assert spec["textures"]["source"] == "dtd" and len(files) == 4
    assert all(len(f["digest"]) > 20 for f in files) and files[0]["name"] == "banded/t1.jpg"
    assert spec["stages"] == {"residual": "draem"} and spec["parameters"]["dtd_root"] == synth["dtd_root"]

    def residual(s):
        rec, _, _ = train_stage("inpformer", "reconstruction", train, {}, params, engine, {}, synthesis=s)
        caplog.clear()
        with caplog.at_level("INFO", logger="uad.engine"):
            _, hist, _ = train_stage("inpformer", "residual", train, {}, params, engine, {}, synthesis=s, previous=rec)
        return hist, " ".join(r.getMessage() for r in caplog.records)

    hist, log = residual(spec)
    assert hist and "training from scratch" in log
    hist, log = residual(_spec("inpformer", train, synth, engine))
    assert not hist and "reusing the finished training" in log  # same textures, same spec: no step runs

    victim = Path(synth["dtd_root"]) / "images" / "dotted" / "t2.jpg"
    Image.fromarray(np.full((40, 48, 3), 9, np.uint8)).save(victim)
    with pytest.raises(SynthesisSpecError, match=r"other DTD textures.*dotted/t2\.jpg.*synthesis node"):
        residual(spec)  # the old spec no longer describes the folder
    new = _spec("inpformer", train, synth, engine)
    assert new["digest"] != spec["digest"]
    assert [f["name"] for f in new["textures"]["dtd"]["files"] if f not in files] == ["dotted/t2.jpg"]
    hist, log = residual(new)
    assert hist and "training from scratch: the synthesis spec changed (textures dtd@" in log

    # a spec kept on disk, read by a later run (--from-nodes) with other parameters, data or
    # setting: an error before anything trains
    def first_stage(s, params_now, data=None, index=train):
        return train_stage("inpformer", "reconstruction", index, data or {}, params, engine, {}, synthesis=s,
                           synthesis_params=params_now)

    first_stage(new, synth)  # the matching parameters pass
    with pytest.raises(SynthesisSpecError, match=r"other synthesis parameters.*synthesis\.recipe"):
        first_stage(new, {**synth, "recipe": "glad"})
    with pytest.raises(SynthesisSpecError, match="other training data"):
        first_stage(new, synth, index=train.iloc[1:])
    fb = _spec("inpformer", train, synths["fallback"], engine)
    with pytest.raises(SynthesisSpecError, match=r"model group\(s\) \['all'\].*another data.setting"):
        first_stage(fb, synths["fallback"], data={"setting": "one_class"})


def test_spec_is_location_free_and_names_bad_sources(tmp_path, monkeypatch):
    import shutil

    from uad.errors import UadError
    from uad.synthesis.spec import build_spec

    monkeypatch.chdir(tmp_path)
    train, synths = _cases(tmp_path)
    a = build_spec("inpformer", {"residual": "draem"}, train, synths["dtd"], 3, [None])
    moved = tmp_path / "dtd_moved"
    shutil.copytree(synths["dtd"]["dtd_root"], moved)
    b = build_spec("inpformer", {"residual": "draem"}, train, {**synths["dtd"], "dtd_root": str(moved)}, 3, [None])
    assert a["digest"] == b["digest"]  # the same textures elsewhere: same spec, no retraining
    c = build_spec("inpformer", {"residual": "draem"}, train, {**synths["dtd"], "recipe": "glad"}, 3, [None])
    assert c["digest"] != a["digest"] and c["stages"] == {"residual": "glad"}
    fb = build_spec("inpformer", {"residual": "draem"}, train, synths["fallback"], 3, ["wood", "washer"])
    assert sorted(fb["textures"]["self"]) == ["washer", "wood"]
    assert all(len(v) == 3 for v in fb["textures"]["self"].values()) and fb["textures"]["procedural"]
    assert all("/wood/" in e["path"] for e in fb["textures"]["self"]["wood"])
    from uad.synthesis.spec import SynthesisSpecError, augment_from_spec

    normal = train[train["label"] == 0]
    aug, _ = augment_from_spec(fb, "residual", normal[normal["class_name"] == "wood"], normal.iloc[:0], 3, 56, 64, "wood")
    assert aug is not None
    with pytest.raises(SynthesisSpecError, match=r"model group\(s\) \['washer', 'wood'\].*'all'"):
        augment_from_spec(fb, "residual", normal, normal.iloc[:0], 3, 56, 64, None)  # one model, spec per class
    with pytest.raises(UadError, match="DTD texture folder not found"):
        build_spec("inpformer", {"residual": "draem"}, train, {"texture_source": "dtd", "dtd_root": str(tmp_path / "none")}, 3, [None])
    with pytest.raises(ValueError, match="texture_source must be one of"):
        build_spec("inpformer", {"residual": "draem"}, train, {"texture_source": "dtdd"}, 3, [None])
    with pytest.raises(ValueError, match="unknown"):
        build_spec("inpformer", {"residual": "draem"}, train, {"config": {"perlin_scal": 3}}, 3, [None])


def test_synthesis_node_feeds_the_training_nodes_in_the_dag():
    """inpformer and costfilter_dinomaly: a synthesis node whose spec every training node reads;
    patchcore (and the others, no pseudo anomalies) has none; patchcore shows its features stage."""
    from uad.pipeline_registry import register_pipelines

    pipes = register_pipelines()
    for name, trains in (("inpformer", ["inpformer.train_reconstruction", "inpformer.train_residual"]),
                         ("costfilter_dinomaly", ["costfilter_dinomaly.train_filter"])):
        nodes = {n.name: n for n in pipes[name].nodes}
        synth = nodes[f"{name}.synthesis"]
        assert synth.outputs == [f"{name}.synthesis_spec", f"{name}.synthesis_preview", f"{name}.synthesis_tags"]
        assert {"train_index", "params:synthesis"} <= set(synth.inputs)
        for t in trains:  # the spec, and the parameters a kept spec must match (--from-nodes)
            assert {f"{name}.synthesis_spec", "params:synthesis"} <= set(nodes[t].inputs)
    for name in ("patchcore", "dinomaly", "rlr", "agpnet"):
        assert not any(n.name.endswith(".synthesis") for n in pipes[name].nodes), name
    pc = {n.name: n for n in pipes["patchcore"].nodes}
    assert "patchcore.train_features" in pc["patchcore.train_fit"].inputs


def test_costfilter_over_patchcore_reads_its_reference_pool_from_the_features_stage(tmp_path, monkeypatch):
    """CostFilter-AD over PatchCore (an embedding base): the features node computes the reference
    pool; training from it equals training that chose the pool itself, loss for loss; the DAG shows
    features -> train_filter for costfilter_patchcore and no features stage over a reconstruction base."""
    from uad.pipeline_registry import register_pipelines
    from uad.framework.pipelines.method.nodes import extract_features, train_stage

    monkeypatch.chdir(tmp_path)
    train, synths = _cases(tmp_path)
    pc = dict(backbone="tf_efficientnet_lite0", weights="bundled", layers=[2, 3], resize=64, crop=64, target_dim=64)
    base, _, _ = train_stage("patchcore", "fit", train, {}, pc, ENGINE, {})
    params = {**COST, "base": "patchcore", "base_params": pc, "templates": 2, "reference_pool": 3}
    spec = _spec("costfilter", train, synths["fallback"], ENGINE)
    feats = extract_features("costfilter", train, {}, params, ENGINE, {}, base=base)
    assert sorted(feats["tensors"]) == ["ref.ref_class", "ref.ref_global", "ref.ref_images", "ref.ref_index"]
    assert feats["tensors"]["ref.ref_images"].shape == (6, 3, 64, 64)  # 3 per class, 2 classes
    a, hist_a, _ = train_stage("costfilter", "filter", train, {}, params, ENGINE, {}, synthesis=spec, base=base,
                               features=feats)
    b, hist_b, _ = train_stage("costfilter", "filter", train, {}, params, ENGINE, {}, synthesis=spec, base=base)
    assert hist_a["train_loss/filter"] == hist_b["train_loss/filter"] and len(hist_a["train_loss/filter"]) == 3
    for k in ("ref.ref_global", "ref.ref_index", "ref.ref_images"):
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert torch.equal(a["tensors"]["ref.ref_global"], feats["tensors"]["ref.ref_global"])
    # a pool from other images changes the training: the features are really read
    other = {k: v.clone() for k, v in feats["tensors"].items()}
    other["ref.ref_images"] = other["ref.ref_images"].flip(0)
    other["ref.ref_global"] = other["ref.ref_global"].flip(0)
    _, hist_c, _ = train_stage("costfilter", "filter", train, {}, params, ENGINE, {}, synthesis=spec, base=base,
                               features={"tensors": other})
    assert hist_c["train_loss/filter"] != hist_a["train_loss/filter"]

    pipes = register_pipelines()
    nodes = {n.name: n for n in pipes["costfilter_patchcore"].nodes}
    assert "patchcore.checkpoint_fit" in nodes["costfilter_patchcore.extract_features"].inputs
    assert "costfilter_patchcore.train_features" in nodes["costfilter_patchcore.train_filter"].inputs
    assert not any(n.name.endswith("extract_features") for n in pipes["costfilter_dinomaly"].nodes)
