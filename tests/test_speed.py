"""The GPU fast paths equal the eager path (checked on CPU).

* the frozen encoder held in bf16 gives bit-for-bit the outputs and gradients of bf16 autocast
  over fp32 weights, and bf16 stays within a stated tolerance of fp32;
* ``torch.compile`` paths (traced with the ``aot_eager`` backend, which runs the captured graphs
  without generating code, so the test stays fast) equal eager to 1e-5 in inference and training;
* a compiler failure, at compile time or in the lazily compiled backward, falls back to eager with
  exactly one warning, never a crash;
* the training loop reads losses on the host only every ``sync_every`` steps and still names the
  first non-finite step; StableAdamW never builds a tensor from host values in its step;
* the scoring loop's host collector and the compiled path's static-batch padding change nothing.

Inductor itself (C++ code generation on CPU, Triton on GPU) is checked by
``benchmarks/check_fast_paths.py`` (recorded in docs/benchmarks.md): compiling a ViT with it takes
minutes on this CPU.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from uad.engine import EngineConfig, NonFiniteLossError, Trainer
from uad.engine.speed import CompiledFn, CompileSpec, hold_frozen_weights
from uad.errors import ConfigError
from uad.methods.registry import build_method
from uad.engine.speed import HostResults

TINY = dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56)
AOT = CompileSpec(True, None, "aot_eager")
BF16_ATOL = 5e-3  # bf16 autocast vs fp32 on these maps (values up to ~4): measured <= 2e-3


@pytest.fixture(scope="module")
def methods():
    return {name: build_method(name, {**TINY, "seed": 3}) for name in ("dinomaly", "inpformer")}


@pytest.fixture(scope="module")
def small():
    """Two encoder layers and two decoder blocks: the same code paths, a quarter of the graph to
    trace (compiling is what these tests pay for)."""
    return {name: build_method(name, {**TINY, "seed": 3, "layers": [0, 1], "decoder_depth": 2})
            for name in ("dinomaly", "inpformer")}


def _images(n=3, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _step(m, stage, x, seed=0):
    """Loss and gradients of one training step from a fixed random state."""
    m.train_mode(stage)
    for p in m.model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with m.autocast():
        loss = m.training_step(stage, {"image": x, "mask": torch.zeros(x.shape[0], 1, 56, 56)}, 500)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["dinomaly", "inpformer"])
def test_held_bf16_encoder_equals_autocast_bit_for_bit_and_restores_fp32(methods, name):
    ref = methods[name]
    held, cast = copy.deepcopy(ref), copy.deepcopy(ref)
    cast.hold_frozen_encoder = False
    held.to("cpu", torch.bfloat16)
    cast.to("cpu", torch.bfloat16)
    qkv = lambda m: m.encoder.model.blocks[0].attn.qkv  # noqa: E731
    assert qkv(held).weight.dtype == torch.bfloat16 and qkv(cast).weight.dtype == torch.float32
    assert held.encoder.model.pos_embed.dtype == torch.float32  # only matmul weights are held
    x = _images()
    a, b = held.predict(x), cast.predict(x)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    stage = held.stages[0]
    la, ga = _step(held, stage, x)
    lb, gb = _step(cast, stage, x)
    assert la == lb and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # bf16 against the fp32 path: within the stated tolerance
    fp32 = ref.predict(x)
    torch.testing.assert_close(a.maps, fp32.maps, rtol=0, atol=BF16_ATOL)
    torch.testing.assert_close(a.scores, fp32.scores, rtol=0, atol=BF16_ATOL)
    # back to fp32: the original values, exactly
    held.to("cpu", None)
    assert all(torch.equal(p, q) for p, q in zip(held.encoder.parameters(), ref.encoder.parameters()))
    assert torch.equal(held.predict(x).maps, fp32.maps)


def test_holding_refuses_a_trainable_module():
    layer = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="trainable"):
        hold_frozen_weights(layer, torch.bfloat16)


@pytest.mark.parametrize("name", ["dinomaly", "inpformer"])
def test_compiled_paths_equal_eager(small, name):
    ref = small[name]
    comp = copy.deepcopy(ref)
    assert comp.enable_compile(AOT) == ["encoder", "model", "map"] and comp.compiled
    x = _images()
    a, b = comp.predict(x), ref.predict(x)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    # a smaller batch is padded to the compiled one: same results as eager on the small batch
    small = comp.predict(x[:2])
    assert small.maps.shape[0] == 2 and comp._static_batch == 3
    torch.testing.assert_close(small.maps, ref.predict(x[:2]).maps, rtol=0, atol=1e-5)
    stage = ref.stages[0]
    la, ga = _step(comp, stage, x)
    lb, gb = _step(ref, stage, x)
    assert abs(la - lb) < 1e-5 and ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6)
    assert all(fn.failed is None for fn in comp._compiled.values())


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_compile_failure_falls_back_to_eager_with_one_warning(small, caplog):
    ref = small["dinomaly"]
    comp = copy.deepcopy(ref)
    comp.enable_compile(CompileSpec(True, None, _broken_backend))
    x = _images()
    with caplog.at_level(logging.WARNING, logger="uad.engine"):
        outs = [comp.predict(x) for _ in range(3)]
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    # the first failure (the encoder's) switches every compiled function of the method to eager
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    assert "runs eagerly from now on" in warnings[0].getMessage()
    assert not comp.compiled
    for out in outs:
        assert torch.equal(out.maps, ref.predict(x).maps)


def test_compiled_fn_warns_once_and_keeps_working():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2

    fn = CompiledFn(f, "f", CompileSpec(True, None, _broken_backend))
    logger = logging.getLogger("uad.engine")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for _ in range(4):
            assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and "no compiler here" in records[0].getMessage() and not fn.active


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 56, 56, generator=g), "mask": torch.zeros(1, 56, 56)}


def _fit(method, tmp_path, **engine):
    engine = {"log_every": 1, **engine}
    cfg = EngineConfig(device="cpu", iterations=3, batch_size=2, progress=False, checkpoint_dir=str(tmp_path), **engine)
    return Trainer(cfg, key="speed").fit(method, method.stages[0], _Toy())


def test_training_falls_back_when_only_the_backward_fails_to_compile(small, tmp_path, caplog):
    from torch._dynamo.backends.common import aot_autograd

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=_broken_backend)
    eager = copy.deepcopy(small["dinomaly"])
    comp = copy.deepcopy(small["dinomaly"])
    a = _fit(eager, tmp_path / "eager")
    with caplog.at_level(logging.WARNING, logger="uad.engine"):
        b = _fit(comp, tmp_path / "comp", compile=True, compile_backend=backend)
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage() and not comp.compiled
    # the failed first step was retried eagerly from the same random state; the encoder had already
    # run its (successfully) compiled graph in that step, equal to eager within float rounding,
    # which Adam's normalised first update amplifies to a few 1e-5 on a handful of weights
    assert [s for s, _ in a["history"]] == [s for s, _ in b["history"]] == [1, 2, 3]
    assert [v for _, v in a["history"]] == pytest.approx([v for _, v in b["history"]], abs=1e-5)
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4)


def test_engine_rejects_a_bad_compile_setting():
    with pytest.raises(ConfigError, match="compile"):
        EngineConfig.from_params({"compile": "fastest"})
    with pytest.raises(ConfigError, match="sync_every"):
        EngineConfig.from_params({"sync_every": 0})
    assert EngineConfig.from_params({"compile": "reduce-overhead"}).compile_spec.mode == "reduce-overhead"


def test_deferred_loss_check_still_names_the_first_non_finite_step(methods, tmp_path, monkeypatch):
    m = copy.deepcopy(methods["dinomaly"])
    real = m.training_step
    seen = []

    def blow(stage, batch, step):
        loss = real(stage, batch, step)
        seen.append(step)
        return loss * float("nan") if step == 1 else loss

    monkeypatch.setattr(m, "training_step", blow)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        _fit(m, tmp_path, log_every=50, sync_every=None)
    assert seen == [0, 1, 2]  # read on the host only at the end of the 3 steps, then reported
    assert not list(tmp_path.rglob("*.safetensors")), "a checkpoint with a non-finite step was written"


def test_stable_adamw_step_builds_no_tensor_from_host_values(monkeypatch):
    from uad.methods.common.optim import StableAdamW

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = StableAdamW(params, lr=2e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state created on the first step

    def refuse(*a, **k):
        raise AssertionError("torch.tensor(...) inside the optimiser step: a host -> device copy on CUDA")

    monkeypatch.setattr(torch, "tensor", refuse)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_host_results_equal_the_plain_copy():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(4, 7, 9, generator=g) * 3, torch.rand(2, 7, 9, generator=g)]
    scores = [m.flatten(1).amax(1) for m in maps]
    masks = [(torch.rand(m.shape[0], 1, 7, 9, generator=g) > 0.5).float() for m in maps]
    host = HostResults(6, torch.device("cpu"))
    for s, m, k in zip(scores, maps, masks):
        host.add(s, m, k)
    s, m, k = host.result()
    assert s.dtype == np.float32 and m.dtype == np.float16 and k.dtype == np.uint8
    np.testing.assert_array_equal(m, np.concatenate([x.numpy().astype(np.float16) for x in maps]))
    np.testing.assert_array_equal(s, np.concatenate([x.numpy() for x in scores]))
    np.testing.assert_array_equal(k, np.concatenate([x[:, 0].numpy().astype(np.uint8) for x in masks]))
    with pytest.raises(ValueError, match="more results"):
        host.add(scores[1], maps[1], masks[1])


def test_uint8_batches_train_and_score_exactly_as_float_batches(small, synthetic_root, tmp_path):
    from uad.data.layouts import scan_dataset
    from uad.data.torch_data import AnomalyImageDataset
    from uad.engine.scoring import score_dataset

    df = scan_dataset(synthetic_root, layout="mvtec")
    train = df[df["split"] == "train"].head(4).reset_index(drop=True)
    test = df[df["split"] == "test"].head(5).reset_index(drop=True)
    spec = small["dinomaly"].input_spec

    def ds(rows):
        return AnomalyImageDataset(rows, spec["resize"], spec["crop"], spec["mean"], spec["std"])

    results = {}
    for flag in (False, True):
        m = copy.deepcopy(small["dinomaly"])
        cfg = EngineConfig(device="cpu", iterations=2, batch_size=2, progress=False, log_every=1,
                           checkpoint_dir=str(tmp_path / str(flag)), uint8_batches=flag)
        trainer = Trainer(cfg, key="u8")
        assert (trainer.loader(ds(test), 2, uint8=True).uad_normalise is not None) is flag
        fit = trainer.fit(m, "train", ds(train))
        scored = score_dataset(m, ds(test), trainer, cfg, "score")
        results[flag] = (fit["history"], [p.detach().clone() for p in m.model.parameters()], scored)
    (h0, p0, s0), (h1, p1, s1) = results[False], results[True]
    assert h0 == h1 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    for a, b in zip(s0, s1):
        np.testing.assert_array_equal(a, b)
