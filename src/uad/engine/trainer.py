"""The iteration-based training loop every gradient-trained method shares.

:class:`Trainer` owns everything that is not the method's own: device placement, bf16 autocast on
CUDA, seeding, a deterministic stream of batches, gradient clipping, the NaN/Inf guard, a tqdm
progress bar with ETA, periodic atomic checkpoints and resume. The method supplies the optimiser
(:meth:`~uad.methods.base.AnomalyMethod.configure_optimization`) and the loss
(:meth:`~uad.methods.base.AnomalyMethod.training_step`).

Resume is exact: the batch stream is a pure function of ``(seed, step)`` (one seeded permutation
per epoch), so a run killed at step ``s`` and restarted from its last checkpoint at step ``c``
replays exactly the batches ``c .. iterations`` it would have seen; the global CPU and CUDA random
states (dropout masks, feature noise) are saved with the checkpoint and restored, and the data
loader draws from a generator of its own, so nothing shifts the restored stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uad.data.torch_data import EpochAwareDataset, finish_batch, uint8_twin
from uad.errors import ConfigError, UadError
from uad.osutil import pid_alive

from . import distributed
from .checkpoint import flatten_optimizer_state, load_state, save_state, unflatten_optimizer_state
from .device import autocast_dtype_for, pick_device, seed_everything
from .speed import CompileSpec, GpuUtilisation

log = logging.getLogger("uad.engine")


class NonFiniteLossError(UadError, FloatingPointError):
    """Raised when a training loss becomes NaN or Inf."""


@dataclass
class EngineConfig:
    """Settings of the shared engine (not of any method).

    ``iterations``: when set, overrides the method's own iteration budget (environments use it
    to scale a run down; it is logged as a parameter like everything else here).
    ``batch_size``/``num_workers``: loader settings; ``batch_size=None`` keeps the method's.
    """

    device: str = "auto"
    precision: str = "bf16"
    seed: int = 1
    deterministic: bool = True
    iterations: int | None = None
    batch_size: int | None = None
    #: the batch of predict / infer (scoring); None: ``batch_size``, else 8. Any value gives the
    #: same maps and scores (inference treats samples independently); larger ones keep a GPU busier.
    infer_batch_size: int | None = None
    num_workers: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    resume: bool = True
    log_every: int = 10
    progress: bool = True
    # The training loop reads the loss on the host (the non-finite guard, the progress bar, the
    # logged history) every ``sync_every`` steps, not at every step, so the CPU keeps queuing GPU
    # work; None: every ``log_every`` steps. A non-finite loss is still reported with its step.
    sync_every: int | None = None
    # torch.compile of the method's hot functions (uad.engine.speed.CompileSpec): false, true or a
    # mode ("reduce-overhead" = CUDA graphs); any compiler failure falls back to eager, one warning.
    compile: Any = False
    compile_backend: str = "inductor"
    # batches of uint8 images through the loader, normalised on the device (4x fewer bytes through
    # workers, pinned memory and the copy; identical values): "auto" (on CUDA), true, false
    uint8_batches: Any = "auto"
    # a folder for the training set's decoded-image cache shared by all loader workers
    # (uad.data.cache.SharedDecodedCache); None: each worker keeps its own small LRU
    decoded_cache: str | None = None
    # data-parallel training (uad.engine.distributed): "single" | "ddp"; with ddp, ``devices`` local
    # processes are started by the node itself (default: every GPU, else 2 CPU processes), or the
    # ranks ``torchrun`` started are used. ``batch_size`` stays the global batch (split over ranks).
    strategy: str = "single"
    devices: int | None = None
    num_nodes: int = 1
    backend: str | None = None  # None: nccl on GPU, gloo on CPU

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "EngineConfig":
        params = dict(params or {})
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ConfigError(f"unknown engine parameter(s) {unknown}; valid: {sorted(valid)}")
        from uad.params import check_range, check_types

        check_types(cls, params, "engine")
        cfg = cls(**params)
        for key, low, none_ok in (("iterations", 1, True), ("batch_size", 1, True), ("infer_batch_size", 1, True),
                                  ("num_workers", 0, False), ("checkpoint_every", 1, False), ("log_every", 1, False),
                                  ("seed", 0, False), ("devices", 1, True), ("num_nodes", 1, False)):
            check_range("engine", key, getattr(cfg, key), low, none_ok)
        if cfg.precision not in ("bf16", "fp32"):
            raise ConfigError(f"engine.precision: {cfg.precision!r} is not bf16 or fp32; set engine.precision")
        if cfg.strategy not in ("single", "ddp"):
            raise ConfigError(f"engine.strategy must be 'single' or 'ddp', got {cfg.strategy!r}")
        CompileSpec.parse(cfg.compile, cfg.compile_backend)  # a bad value fails here, not mid-run
        if cfg.uint8_batches not in ("auto", True, False):
            raise ConfigError(f"engine.uint8_batches must be auto, true or false, got {cfg.uint8_batches!r}")
        if cfg.sync_every is not None and int(cfg.sync_every) < 1:
            raise ConfigError(f"engine.sync_every must be >= 1, got {cfg.sync_every!r}")
        return cfg

    @property
    def compile_spec(self) -> CompileSpec:
        return CompileSpec.parse(self.compile, self.compile_backend)


class StepSampler(Sampler[int]):
    """Deterministic stream of sample indices for iteration-based training.

    Epoch ``e`` is ``randperm(n)`` drawn from a generator seeded with ``seed * 1_000_003 + e``;
    epochs are concatenated and the stream starts at sample ``start * batch_size``. Indices are
    returned as *virtual* indices ``e * n + i`` so an :class:`EpochAwareDataset` can tell the
    dataset which epoch a sample belongs to (augmentations seeded by ``(seed, epoch, index)``
    stay deterministic whatever the worker scheduling).
    """

    def __init__(self, n: int, batch_size: int, num_steps: int, seed: int, start_step: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot train on an empty dataset")
        if batch_size % world:
            raise ConfigError(f"the batch of {batch_size} does not split over {world} ranks; use a multiple of {world}")
        self.n, self.bs, self.steps, self.seed, self.start, self.shuffle = n, batch_size, num_steps, seed, start_step, shuffle
        self.rank, self.world = int(rank), int(world)

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.bs // self.world

    def __iter__(self) -> Iterator[int]:
        """This rank's slice of every global batch (the whole stream with one rank)."""
        if self.world == 1:
            yield from self._global()
            return
        local = self.bs // self.world
        lo, batch = self.rank * local, []
        for i in self._global():
            batch.append(i)
            if len(batch) == self.bs:
                yield from batch[lo:lo + local]
                batch = []

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).numpy()

    def _global(self) -> Iterator[int]:
        first = self.start * self.bs
        total = max(0, self.steps - self.start) * self.bs
        epoch, offset = divmod(first, self.n)
        produced = 0
        while produced < total:
            perm = self._perm(epoch)[offset:]
            take = perm[: total - produced]
            yield from (int(epoch * self.n + i) for i in take)
            produced += len(take)
            epoch, offset = epoch + 1, 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: names a run's checkpoint folder for resume."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class FitResult:
    stage: str
    iterations: int
    resumed_from: int
    final_loss: float
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)
    #: optimisation steps per second of this run (steps run / seconds)
    it_per_s: float | None = None
    #: mean GPU utilisation (%) while training, sampled every second; None off CUDA
    gpu_utilisation: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Runs gradient-trained stages of a method. See the module docstring."""

    def __init__(self, config: EngineConfig | Mapping[str, Any] | None = None, key: str = "",
                 on_log: Callable[[str, int, float], None] | None = None,
                 key_parts: Mapping[str, Any] | None = None):
        """``key`` names the resume folder; ``key_parts`` (JSON-able) are what it was hashed from:
        recorded beside the checkpoint, they let a later run say why it trains again."""
        self.config = config if isinstance(config, EngineConfig) else EngineConfig.from_params(config)
        self.device = pick_device(self.config.device)
        self.autocast_dtype = autocast_dtype_for(self.device, self.config.precision)
        self.key = key if key or key_parts is None else run_key(dict(key_parts))
        self.key_parts = _jsonable(dict(key_parts or {}))
        self._owned = False  # run.json of the resume folder written by this process
        self.on_log = on_log

    # ------------------------------------------------------------------ helpers
    def prepare(self, method) -> None:
        """Seed and move ``method`` to the engine's device with its autocast dtype (its frozen
        encoder held in that dtype where the method allows it); with ``compile`` on, route its hot
        functions through ``torch.compile``."""
        seed_everything(self.config.seed, self.config.deterministic)
        method.to(self.device, self.autocast_dtype)
        spec = self.config.compile_spec
        if spec.enabled and not getattr(method, "_uad_compile_set_up", False):
            names = method.enable_compile(spec)
            log.info("%s: %s for %s", method.name, spec.describe(), ", ".join(names) if names else
                     "nothing (this method has no compiled path; it runs eagerly)")
            method._uad_compile_set_up = True

    def checkpoint_path(self, method, stage: str) -> Path | None:
        if not self.config.checkpoint_dir:
            return None
        return Path(self.config.checkpoint_dir) / f"{method.name}-{stage}-{self.key or 'run'}" / "last.safetensors"

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, num_steps: int | None = None,
               start_step: int = 0, uint8: bool = False) -> DataLoader:
        """A DataLoader over ``dataset``: a deterministic step stream when ``num_steps`` is set
        (``batch_size`` is then the global batch: each rank of a data-parallel run loads its slice
        of every batch), one ordered pass otherwise. ``uint8=True`` (for a consumer that calls
        :meth:`finish`) lets images travel as uint8 when ``engine.uint8_batches`` allows it."""
        world, rank = distributed.world_size(), distributed.rank()
        cfg = self.config
        normalise = None
        if uint8 and (cfg.uint8_batches is True or (cfg.uint8_batches == "auto" and self.device.type == "cuda")):
            twin = uint8_twin(dataset)
            if twin is not None:
                dataset, normalise = twin[0], twin[1].normalise
        common: dict[str, Any] = dict(
            batch_size=batch_size if num_steps is None else batch_size // world,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            # The loader's own generator: creating an iterator draws a base seed, and drawing it
            # from the global generator would shift every later dropout mask / noise draw of a
            # resumed run (whose global state was restored before the iterator was created).
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        if cfg.num_workers > 0:
            common["prefetch_factor"] = 4
        if num_steps is None:
            out = DataLoader(dataset, shuffle=False, drop_last=False, **common)
        else:
            sampler = StepSampler(len(dataset), batch_size, num_steps, cfg.seed, start_step, shuffle, rank, world)
            out = DataLoader(EpochAwareDataset(dataset), sampler=sampler, drop_last=False, **common)
        out.uad_normalise = normalise  # what finish() applies to this loader's batches
        return out

    def finish(self, batch: Any, loader: Any) -> Any:
        """A batch of ``loader`` moved to the device, uint8 images normalised there."""
        batch = to_device(batch, self.device)
        normalise = getattr(loader, "uad_normalise", None)
        if normalise is None:
            return batch

        return finish_batch(batch, normalise)

    # ------------------------------------------------------------------ main loop
    def fit(self, method, stage: str, loader: DataLoader | Dataset) -> dict[str, Any]:
        """Train ``stage`` of ``method`` on the samples of ``loader`` (a DataLoader or Dataset)."""
        cfg = self.config
        dataset = loader.dataset if isinstance(loader, DataLoader) else loader
        batch_size = cfg.batch_size or (loader.batch_size if isinstance(loader, DataLoader) else None) or 8
        self.prepare(method)
        setup = method.configure_optimization(stage, len(dataset))
        if setup is None:
            raise ValueError(f"{method.name} stage {stage!r} has no optimiser; it must override fit_stage")
        iterations = int(cfg.iterations or setup.iterations)
        # A schedule built for the method's own budget is rebuilt by the method when the engine
        # overrides iterations: methods read ``trainer_iterations`` through this hook.
        from uad.methods.capabilities import RescalableSchedule

        if cfg.iterations and isinstance(method, RescalableSchedule):
            setup = method.rescale_schedule(setup, iterations)
        params = setup.parameters or [p for m in method.trainable_modules().values() for p in m.parameters() if p.requires_grad]

        start = 0
        ckpt = self.checkpoint_path(method, stage)
        if ckpt is not None and cfg.resume and ckpt.is_file():
            start = self._try_restore(ckpt, method, setup)
        if start and ckpt is not None:
            if start >= iterations:
                log.info("%s/%s: reusing the finished training in %s (same training data contents, parameters "
                         "and engine settings; engine.resume=false trains again)", method.name, stage, ckpt.parent)
            else:
                log.info("resuming %s/%s from step %d (%s)", method.name, stage, start, ckpt)
        elif ckpt is not None:
            log.info("%s/%s: training from scratch: %s", method.name, stage, self._why_new(ckpt, method, stage))

        history: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        last_loss = float("nan")
        if start >= iterations:
            return FitResult(stage, iterations, start, last_loss, 0.0, history).as_dict()
        world, main = distributed.world_size(), distributed.is_main()
        if world > 1:
            log.info("%s/%s: data-parallel over %d ranks, global batch %d (%d per rank)", method.name, stage, world,
                     batch_size, batch_size // world)
        stream = self.loader(dataset, batch_size, shuffle=True, num_steps=iterations, start_step=start, uint8=True)
        bar = _progress(total=iterations, initial=start, desc=f"{method.name}:{stage}", enabled=cfg.progress and main)
        running = None
        step = start
        every = int(cfg.sync_every or cfg.log_every or 1)
        pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read on the host
        first_compiled = bool(getattr(method, "compiled", False))

        def settle() -> None:
            """Read the pending losses on the host (one sync): non-finite guard, running mean."""
            nonlocal last_loss, running
            if not pending:
                return
            losses = torch.stack([v.float().reshape(()) for _, v in pending])
            values = (distributed.mean_across_all(losses) if world > 1 else losses.double().cpu()).tolist()
            steps = [s for s, _ in pending]
            pending.clear()
            for s, value in zip(steps, values):  # every rank sees the same values: all stop together
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{method.name}/{stage}: loss became {value} at step {s}; "
                        "lower the learning rate, check the input data for NaNs, or use precision: fp32"
                    )
                last_loss = value
                running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)

        gpu = GpuUtilisation(self.device).__enter__()
        try:
            for step, batch in enumerate(stream, start=start):
                batch = self.finish(batch, stream)
                if first_compiled:  # the first compiled step also compiles the backward: may fail there
                    first_compiled = False
                    rng = _rng_state()
                    try:
                        loss = optimisation_step(method, stage, setup, batch, step, params, world)
                    except Exception as e:  # noqa: BLE001 - retried eagerly; a real error recurs there
                        method.compile_fallback(e)
                        _set_rng_state(rng)  # the eager retry draws the same dropout masks
                        setup.optimizer.zero_grad(set_to_none=True)
                        loss = optimisation_step(method, stage, setup, batch, step, params, world)
                else:
                    loss = optimisation_step(method, stage, setup, batch, step, params, world)
                pending.append((step, loss))
                bar.update(1)
                done = step + 1
                logged = done % cfg.log_every == 0 or done == iterations
                saving = ckpt is not None and (done % cfg.checkpoint_every == 0 or done == iterations)
                if logged or saving or done % every == 0:
                    settle()  # before a checkpoint is written: a non-finite step is never saved
                if logged:
                    history.append((done, last_loss))
                    if self.on_log and main:
                        self.on_log(stage, done, last_loss)
                if saving:
                    if main:  # one writer; the others wait until the file is complete
                        self._save(ckpt, method, setup, done, stage)
                    distributed.barrier()
            settle()
        finally:
            bar.close()
            utilisation = gpu.stop()
        if ckpt is not None and step + 1 >= iterations and main:
            self._prune(ckpt, method, stage)
        seconds = time.perf_counter() - t0
        rate = (iterations - start) / seconds if seconds > 0 else None
        if utilisation is not None:
            log.info("%s/%s: %.2f it/s, GPU utilisation %.0f %% (mean of %d samples)", method.name, stage, rate or 0.0,
                     utilisation, len(gpu.samples))
        return FitResult(stage, iterations, start, last_loss, seconds, history, rate, utilisation).as_dict()

    # ------------------------------------------------------------------ resume folders and checkpoints
    def _siblings(self, ckpt: Path, method, stage: str) -> list[Path]:
        """Other resume folders of the same method, stage and model group (one-class: per class)."""
        out = []
        for d in ckpt.parent.parent.glob(f"{method.name}-{stage}-*"):
            if d == ckpt.parent or not d.is_dir():
                continue
            rec = _read_json(d / "run.json") or {}
            parts = rec.get("parts")
            if parts is not None and parts.get("group") != self.key_parts.get("group"):
                continue
            out.append(d)
        return sorted(out, key=lambda d: d.stat().st_mtime)

    def _why_new(self, ckpt: Path, method, stage: str) -> str:
        """Why this run cannot reuse an earlier one: what differs from the latest earlier settings."""
        if ckpt.is_file():
            return "engine.resume is false"
        known = [(d, (_read_json(d / "run.json") or {}).get("parts")) for d in self._siblings(ckpt, method, stage)]
        known = [(d, p) for d, p in known if p]
        if not known:
            return "no earlier training of this method and stage with these settings"
        folder, old = known[-1]
        reasons = []
        for k in sorted(set(old) | set(self.key_parts)):
            a, b = old.get(k), self.key_parts.get(k)
            if a == b:
                continue
            if k == "data":
                reasons.append(f"the training data changed (content fingerprint {str(a)[:12]} -> {str(b)[:12]})")
            elif k == "synthesis" and isinstance(a, dict) and isinstance(b, dict):
                what = ", ".join(f"{p} {a.get(p)} -> {b.get(p)}" for p in ("recipes", "textures", "parameters")
                                 if a.get(p) != b.get(p)) or f"digest {a.get('digest')} -> {b.get('digest')}"
                reasons.append(f"the synthesis spec changed ({what})")
            elif k == "params" and isinstance(a, dict) and isinstance(b, dict):
                diff = ", ".join(f"{p}: {a.get(p)!r} -> {b.get(p)!r}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p))
                reasons.append(f"the method parameters changed ({diff})")
            else:
                reasons.append(f"{k} changed ({a!r} -> {b!r})")
        return "; ".join(reasons) + f" since {folder.name}"

    def _prune(self, ckpt: Path, method, stage: str) -> None:
        """A finished training keeps its final checkpoint; resume folders of earlier settings of the
        same method, stage and group are deleted (each holds weights and optimiser state)."""
        for d in self._siblings(ckpt, method, stage):
            owner = (_read_json(d / "run.json") or {}).get("owner") or {}
            if (owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid()
                    and pid_alive(owner.get("pid"))):
                continue  # another run (other settings) is training there right now
            shutil.rmtree(d, ignore_errors=True)
            log.info("%s/%s: removed the earlier resume checkpoint %s", method.name, stage, d)

    def _save(self, path: Path, method, setup, step: int, stage: str) -> None:
        if self.key_parts and not self._owned:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"parts": self.key_parts, "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
            tmp = path.parent / "run.json.tmp"
            tmp.write_text(json.dumps(record, sort_keys=True, indent=1))
            tmp.replace(path.parent / "run.json")
            self._owned = True
        tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
        tensors.update({f"train.{k}": v.detach().cpu().contiguous() for k, v in method.training_state().items()})
        opt_t, opt_meta = flatten_optimizer_state(setup.optimizer.state_dict())
        tensors.update(opt_t)
        meta = {
            "step": step,
            "stage": stage,
            "method": method.name,
            "optimizer": opt_meta,
            "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
            "torch_rng": torch.get_rng_state().tolist(),
            "cuda_rng": [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else None,
        }
        save_state(path, tensors, _jsonable(meta))

    def _try_restore(self, path: Path, method, setup) -> int:
        """:meth:`_restore`, or 0 with a warning when the checkpoint does not fit the method (a
        shape or key mismatch: the method changed under an unchanged key); the method and the
        optimiser are put back as they were before the attempt."""
        model_before = {k: v.clone() for k, v in method.state_dict().items()}
        train_before = {k: v.clone() for k, v in method.training_state().items()}
        opt_before = setup.optimizer.state_dict()
        try:
            return self._restore(path, method, setup)
        except (RuntimeError, KeyError, ValueError) as e:
            method.load_state_dict(model_before)
            method.load_training_state(train_before)
            method.to(self.device, self.autocast_dtype)
            setup.optimizer.load_state_dict(opt_before)
            first = str(e).strip().splitlines()
            log.warning("%s: cannot resume from %s (%s); training from scratch", method.name, path,
                        " ".join(line.strip() for line in first[:3]))
            return 0

    def _restore(self, path: Path, method, setup) -> int:
        tensors, meta = load_state(path)
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        method.load_state_dict(model)
        method.load_training_state({k[len("train."):]: v for k, v in tensors.items() if k.startswith("train.")})
        method.to(self.device, self.autocast_dtype)
        opt_state = unflatten_optimizer_state({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
        setup.optimizer.load_state_dict(opt_state)
        if setup.scheduler is not None and meta.get("scheduler") is not None:
            setup.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("torch_rng") is not None:
            torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        if meta.get("cuda_rng") and torch.cuda.is_available():  # dropout / noise drawn on the GPU
            torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in meta["cuda_rng"]])
        return int(meta["step"])


def optimisation_step(method, stage: str, setup, batch, step: int, params=None, world: int = 1) -> torch.Tensor:
    """One optimisation step as the engine runs it: train mode, autocast, the method's loss,
    backward, (data-parallel gradient averaging), gradient-norm clip, optimiser and schedule
    step, the method's post-step hook. Returns the loss, detached and still on the device: no
    host sync (the benchmarks time exactly this).

    A method whose ``training_step`` returns a list of loss *functions* is stepped once per
    function, in order: ``zero_grad(set_to_none=False)``, the function's forward and loss,
    backward, step. Each forward runs after the previous steps, as in the released RLR loop on
    torch < 2.0 (every parameter that has had a gradient keeps a zero-filled one, so Adam moves it
    at every step, and a later level's forward sees it moved). The schedule steps once; the
    returned loss is the sum."""
    params = setup.parameters if params is None else params
    method.train_mode(stage)
    with method.autocast():
        loss = method.training_step(stage, batch, step)
    if isinstance(loss, (list, tuple)):
        if step > 0:
            # exactly the state an uninterrupted run has here (a resumed one starts without grads)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        parts = []
        for fn in loss:
            setup.optimizer.zero_grad(set_to_none=False)
            with method.autocast():
                part = fn()
            part.backward()
            _finish_gradients(setup, params, world)
            setup.optimizer.step()
            parts.append(part.detach())
        loss = torch.stack(parts).sum()
    else:
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _finish_gradients(setup, params, world)
        setup.optimizer.step()
    if setup.scheduler is not None:
        setup.scheduler.step()
    method.after_optimizer_step(stage, step)
    return loss.detach()


def _finish_gradients(setup, params, world: int) -> None:
    if world > 1:
        distributed.average_gradients(params)
    if setup.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(params, setup.grad_clip_norm)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from uad.progress import progress

    return progress(total=total, initial=initial, desc=desc, unit="step", enabled=enabled)
