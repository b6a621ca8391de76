"""Data-parallel training on CPU (gloo, 2 spawned processes) equals one process with the same
global batch; only rank 0 writes; resume under DDP is exact; sharding helpers."""

from __future__ import annotations

import pytest
import torch

from ddp_cases import score, train
from uad.engine import distributed
from uad.engine.trainer import StepSampler

pytestmark = pytest.mark.slow


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, f"largest difference {worst}"
    return worst


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
    """One process's training (shared by the tests that compare with it)."""
    if name not in _SINGLE:
        _SINGLE[name] = train(name, stage, {}, iterations=4, batch=4)
    return _SINGLE[name]


@pytest.mark.parametrize("name,stage,params", [
    ("dinomaly", "train", {}),  # hard mining over the global batch (threshold from every rank)
    ("inpformer", "reconstruction", {}),  # soft-mining weights from the global batch mean
])
def test_two_ranks_equal_one_process(name, stage, params):
    single = _single(name, stage)
    double = distributed.launch(train, (name, stage, params, 4, 4), world=2, backend="gloo")
    _close(single, double)


def test_resume_under_ddp_is_exact(tmp_path):
    """A 2-rank run killed after step 2 and restarted resumes from rank 0's checkpoint (read by
    both ranks) and ends where an uninterrupted run ends (one process: equal, as shown above)."""
    whole = _single("dinomaly", "train")
    with pytest.raises(Exception, match="stopped after step"):
        distributed.launch(train, ("dinomaly", "train", {}, 4, 4, str(tmp_path), 2), world=2, backend="gloo")
    assert len(list(tmp_path.glob("*/last.safetensors"))) == 1  # written once, by rank 0
    resumed = distributed.launch(train, ("dinomaly", "train", {}, 4, 4, str(tmp_path)), world=2, backend="gloo")
    _close(whole, resumed)


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
