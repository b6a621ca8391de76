"""Data-parallel training on CPU (gloo, 2 spawned processes) equals one process with the same
global batch; only rank 0 writes; resume under DDP is exact; sharding helpers."""

from __future__ import annotations

import pytest
import torch

from ddp_cases import score, train, wrong_averages
from uad.engine import distributed
from uad.engine.trainer import StepSampler

pytestmark = pytest.mark.slow


def test_step_sampler_ranks_split_every_global_batch():
    one = list(StepSampler(10, 4, 5, seed=1))
    ranks = [list(StepSampler(10, 4, 5, seed=1, rank=r, world=2)) for r in range(2)]
    for step in range(5):
        glob = one[4 * step:4 * step + 4]
        assert ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2] == glob
    with pytest.raises(Exception, match="does not split"):
        StepSampler(10, 5, 2, seed=1, world=2)
    assert distributed.shard_indices(7, 0, 2) == [0, 1, 2, 3] and distributed.shard_indices(7, 1, 2) == [4, 5, 6]


_SINGLE: dict = {}


def _single(name: str, stage: str) -> dict:
    """One process's training, recorded (shared by the tests that compare with it)."""
    if name not in _SINGLE:
        _SINGLE[name] = train(name, stage, {}, iterations=4, batch=4, record=True)
    return _SINGLE[name]


def _assert_first_step_gradients_equal(single: dict, double: dict) -> tuple[float, float]:
    """The first step's gradient after the all-reduce, before the clip, equals the one process's
    whole-batch gradient to float rounding: 1e-5 of its largest entry. Returns (worst gap, largest)."""
    a, b = single["grads"][0], double["grads"][0]
    assert set(a) == set(b) and a
    scale = max(g.abs().max().item() for g in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert scale > 0 and worst <= 1e-5 * scale, f"first step: gradients differ by {worst:.3g} (largest {scale:.3g})"
    return worst, scale


def _norm(grads: dict) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()


@pytest.mark.parametrize("name,stage,params", [
    ("dinomaly", "train", {}),  # hard mining over the global batch (threshold from every rank)
    ("inpformer", "reconstruction", {}),  # soft-mining weights from the global batch mean
])
def test_two_ranks_equal_one_process(name, stage, params):
    """2 ranks x 2 images equal one process with 4: the first step's gradient after the all-reduce
    and before the gradient-norm clip, to float rounding (1e-5 of its largest entry), and every
    step's loss (relative 1e-5).

    Before the clip: both methods clip the gradient to a fixed norm (0.1), and the first step's
    gradient is larger than that here, so after the clip a sum over the ranks instead of their
    mean would look the same; before it, a sum is twice the gradient, and ranks that skip the
    all-reduce each have their own half's (test_gradient_check_catches_a_wrong_average).

    Not the weights, nor later gradients, entry by entry: Adam divides each gradient entry by its
    own running magnitude, so an entry that is rounding noise on both sides (1e-9) still moves its
    weight by about the learning rate, in whichever direction the noise points. Measured on torch
    2.14 CPU: after 4 steps such weights differ by up to 7e-4 (updates 1.3e-3), and the second
    step's gradients by 1.6e-4 of their largest entry, while the first step's agree to 1e-7 after
    the clip and 7e-7 before it (dinomaly: 1.9e-5 of 28.9)."""
    single = _single(name, stage)
    double = distributed.launch(train, (name, stage, params, 4, 4), world=2, backend="gloo", kwargs={"record": True})
    assert len(single["grads"]) == len(double["grads"]) == 4
    assert single["clip"] == double["clip"]
    _assert_first_step_gradients_equal(single, double)
    torch.testing.assert_close(single["losses"], double["losses"], rtol=1e-5, atol=0)


_WRONG: dict = {}


@pytest.mark.parametrize("averaging", ["sum", "none"])
def test_gradient_check_catches_a_wrong_average(averaging):
    """The check above fails for ranks whose gradient "average" is a sum over the ranks (no
    division by the world size) or no all-reduce at all (each rank its own half of the batch):
    ddp_cases.train puts that in place of ``distributed.average_gradients`` in each rank (one
    group of ranks runs both, for the first step). The clip binds here (the gradient's norm is
    far above it), so the check would not see the sum after the clip."""
    single = _single("dinomaly", "train")
    if not _WRONG:
        _WRONG.update(distributed.launch(wrong_averages, ("dinomaly", "train", {}, 4, 4), world=2, backend="gloo"))
    wrong = _WRONG[averaging]
    assert len(wrong["grads"]) == 1 and wrong["clip"] == single["clip"]
    assert _norm(single["grads"][0]) > 10 * single["clip"], "the clip does not bind: this case shows nothing about it"
    with pytest.raises(AssertionError, match="first step: gradients differ by"):
        _assert_first_step_gradients_equal(single, wrong)
    a, b = single["grads"][0], wrong["grads"][0]
    if averaging == "sum":  # the world size times the whole-batch gradient
        scale = max(g.abs().max().item() for g in a.values())
        for k in a:
            torch.testing.assert_close(b[k], 2 * a[k], rtol=0, atol=2e-5 * scale)


def test_resume_under_ddp_is_exact(tmp_path):
    """A 2-rank run killed after step 2 and restarted resumes from rank 0's checkpoint (read by
    both ranks) and ends exactly where an uninterrupted 2-rank run ends."""
    whole = distributed.launch(train, ("dinomaly", "train", {}, 4, 4), world=2, backend="gloo")
    with pytest.raises(Exception, match="stopped after step"):
        distributed.launch(train, ("dinomaly", "train", {}, 4, 4, str(tmp_path), 2), world=2, backend="gloo")
    assert len(list(tmp_path.glob("*/last.safetensors"))) == 1  # written once, by rank 0
    resumed = distributed.launch(train, ("dinomaly", "train", {}, 4, 4, str(tmp_path)), world=2, backend="gloo")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_sharded_inference_equals_one_process():
    single = score()
    sharded = distributed.launch(score, world=2, backend="gloo")  # 11 images, batches of 4: ranks get 8 and 3
    for key in single:
        assert torch.equal(single[key], sharded[key]), key


def test_single_process_helpers_are_identities():
    t = torch.arange(6.0, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_cat(t) is t and distributed.sum_across(t) is t
    assert distributed.mean_across(torch.tensor(2.5)) == 2.5


@pytest.mark.skipif(not __import__("os").path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_single_node_ranks_listen_on_loopback_only():
    """A 2-rank CPU group on one machine: every socket of both ranks (rendezvous and collectives)
    is on a loopback address; none on a wildcard (0.0.0.0 / ::) reachable from the network."""
    import ipaddress

    from ddp_cases import socket_addresses

    sockets = distributed.launch(socket_addresses, world=2, backend="gloo")
    assert sockets, "no socket was seen"
    for addr, state in sockets:
        ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
        assert not ip.is_unspecified, f"{addr} (state {state}) listens on every address"
        assert ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback), addr
