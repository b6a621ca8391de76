"""RLR side by side with the public code (``hlr7999/RLR``): equal outputs, and the speed of both.

Point ``--official`` at an extracted copy of the public repository (it is never part of this
project). The script builds this project's :class:`uad.methods.rlr.RLR` and, with the *same*
weights copied in, the public code's per-level ``models.model.RLR`` and its ``Trainer``; then:

1. forward: the reconstruction of every level from the same tokens (train and eval mode);
2. noise: the public ``Trainer.add_jitter`` against :func:`uad.methods.rlr.losses.feature_jitter`
   fed the same normal draws;
3. one optimisation step: the public ``Trainer.train`` for one epoch of one batch (one Adam step
   per level) against one step of this project's engine (the summed loss, one Adam step): the loss
   it prints and every parameter afterwards;
4. inference after that step: the public ``Trainer.test`` pixel map (before its smoothing) and
   image scores (captured where they enter ``roc_auc_score``) against :meth:`RLR.predict`;
5. speed: training steps/s and inference img/s of both on this machine at the same batch and size.

The public code targets CUDA and old NumPy; the script only adapts what it cannot run here
(``.cuda()`` on its masks and its position-embedding device default become no-ops on a CPU
machine, ``np.bool`` is aliased, and ``cv2`` / ``skimage``, imported but unused on these paths,
are stubbed when missing). Its arithmetic is untouched.

Usage::

    git -C /path/to/RLR-mirror archive HEAD | tar -x -C /tmp/rlr_official
    python benchmarks/equiv_rlr.py --official /tmp/rlr_official                    # B6, 256, batch 2, CPU
    python benchmarks/equiv_rlr.py --official /tmp/rlr_official --device cuda --batch 16 --iters 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import _bench_common as bc  # puts src/ on sys.path for a bare checkout

import numpy as np
import torch

from uad.methods.rlr import RLR


def _import_official(path: Path, device: torch.device):
    for name in ("cv2", "skimage", "skimage.measure"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.label = mod.regionprops = None  # names imported by utils.utils, unused here
            sys.modules[name] = mod
    if not hasattr(np, "bool"):
        np.bool = bool  # the public code uses the alias NumPy removed in 1.24
    sys.path.insert(0, str(path))
    import models.embedding as emb  # noqa: E402
    import models.model as mdl  # noqa: E402
    import trainer as tr  # noqa: E402

    if device.type != "cuda":  # the public code places its position embedding and masks on CUDA
        emb.PositionalEmbedding.__init__.__defaults__ = (16, 16, device)
        emb.Embedding2D.__init__.__defaults__ = (0.0, 16, 16, 1, True, device)
        torch.Tensor.cuda = lambda self, *a, **k: self
    return mdl, tr


def _official_args(**kw):
    base = dict(blocks=["mca", "nsa"], blocks_gate="none", layers=4, ref_len=1, block_mode="parallel",
                ref_loss=False, no_avg=False, with_mask=False, feature_jitter=0.0, noise_prob=1.0,
                with_decoder=False, num_epochs=1, save_prefix="", lr=1e-4)
    base.update(kw)
    return argparse.Namespace(**base)


def _as_theirs(ours: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This project's level reconstructor as the public ``RLR`` module's state dict: every key of
    theirs, from our tensors in their layout (1x1 conv weights, packed q/k/v, a leading batch axis
    on the reference). Used to copy the weights in and to compare every parameter afterwards."""
    sd = {
        "embedding.project_embedding.project.weight": ours.embed.weight[:, :, None],
        "embedding.project_embedding.project.bias": ours.embed.bias,
        "ref_mca": ours.reference[None],
        "ref_mca_embedding.project_embedding.project.weight": ours.ref_embed.weight[:, :, None],
        "ref_mca_embedding.project_embedding.project.bias": ours.ref_embed.bias,
        "encoder.norm.weight": ours.norm.weight, "encoder.norm.bias": ours.norm.bias,
        "projection.weight": ours.head.weight, "projection.bias": ours.head.bias,
    }
    names = {"lca": "mca", "mlka": "nsa"}  # the public code's names for LCA and MLKA
    for i, blk in enumerate(ours.blocks):
        p = f"encoder.encode_layers.{i}."
        for mixer in blk.mixers:
            n = p + names[mixer.kind]
            sd[n + ".in_proj_weight"] = torch.cat([mixer.q.weight, mixer.k.weight, mixer.v.weight])
            sd[n + ".in_proj_bias"] = torch.cat([mixer.q.bias, mixer.k.bias, mixer.v.bias])
            sd[n + ".out_proj.weight"] = mixer.proj.weight
            sd[n + ".out_proj.bias"] = mixer.proj.bias
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("ffn.fc1", "mlp.fc1"), ("ffn.fc2", "mlp.fc2")):
            sd[f"{p}{a}.weight"] = blk.get_submodule(b).weight
            sd[f"{p}{a}.bias"] = blk.get_submodule(b).bias
    return {k: v.detach() for k, v in sd.items()}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="extracted public RLR repository")
    ap.add_argument("--backbone", default="tf_efficientnet_b6", help="timm CNN (random weights)")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers = [int(i) for i in args.layers.split(",")]
    mdl, tr = _import_official(Path(args.official).resolve(), device)
    print(f"device: {bc.device_name(device)}; torch {torch.__version__}; fp32; backbone {args.backbone} (random "
          f"weights), {args.size} px, layers {layers}, batch {args.batch}\n"
          f"command: python benchmarks/equiv_rlr.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")

    import logging
    logging.getLogger("uad.backbones").setLevel(logging.ERROR)
    ours = RLR({"backbone": args.backbone, "weights": "random", "allow_random": True, "layers": layers,
                "resize": args.size, "crop": args.size, "noise_scale": 0.0}).to(device)
    enc = ours.encoder.model  # the timm features model both sides run
    seq_lens = [h * w for h, w in ours.grids]
    theirs = []
    torch.manual_seed(0)
    for lvl, n in zip(ours.model.levels, seq_lens):
        m = mdl.RLR(seq_len=n, in_channels=lvl.channels, out_channels=lvl.channels, d_model=lvl.dim, n_heads=8,
                    args=_official_args()).to(device)
        m.load_state_dict({k: v.clone() for k, v in _as_theirs(lvl).items()}, strict=True)
        theirs.append(m)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    worst: dict[str, float] = {}

    # 1. forward, same tokens
    tokens = ours.encode(images)
    for mode in ("train", "eval"):
        ours.model.train(mode == "train")
        for m in theirs:
            m.train(mode == "train")
        with torch.no_grad():
            for j, (lvl, m, t) in enumerate(zip(ours.model.levels, theirs, tokens)):
                worst[f"forward level {j} ({mode})"] = _maxdiff(lvl(t), m(t))

    # 2. noise: same normal draws (the public code draws a uniform permutation first, then the normals)
    t0 = tokens[0]
    trainer_obj = tr.Trainer.__new__(tr.Trainer)
    torch.manual_seed(123)
    theirs_j = trainer_obj.add_jitter(t0, 4.0, 1.0, device, False)
    torch.manual_seed(123)
    torch.rand(t0.shape[0], t0.shape[1], device=device)
    eps = torch.randn(t0.shape).to(device)
    from uad.methods.rlr.losses import feature_jitter
    worst["feature jitter (scale 4)"] = _maxdiff(feature_jitter(t0, 4.0, 1.0, noise=eps), theirs_j)

    # 3. one optimisation step: the public Trainer.train (1 epoch, 1 batch) vs this project's step
    ncls = max(1, args.batch // 2)
    labels = torch.tensor([0] * (args.batch - ncls) + [1] * ncls)
    masks = torch.zeros(args.batch, 1, args.size, args.size)
    masks[args.batch - ncls:, :, args.size // 4: args.size // 2, args.size // 3: args.size // 2] = 1
    names = [f"img{i}" for i in range(args.batch)]
    batch = (images, labels, masks, names, ["x"] * args.batch)
    captured: list[np.ndarray] = []

    def capture_auc(y, s):
        captured.append(np.asarray(s).copy())
        return 0.5

    save_dir = tempfile.mkdtemp(prefix="rlr_official_")
    off = tr.Trainer.__new__(tr.Trainer)
    off.args = _official_args(feature_levels=len(layers), device=device, inp_size=args.size, save_path=save_dir)
    off.models, off.encoder, off.seq_lens = theirs, enc, seq_lens
    off.ws = [h for h, _ in ours.grids]
    off.class_names, off.train_loader, off.test_loaders = ["synthetic"], [batch], {"synthetic": [batch]}
    off.start_epoch, off.best_img_auc, off.best_pix_auc, off.best_img_aucs, off.best_pix_aucs = 0, 0.0, 0.0, [], []
    off.optimizer = torch.optim.Adam([p for m in theirs for p in m.parameters()], lr=1e-4)
    off.l2_criterion, off.cos_criterion = torch.nn.MSELoss(), torch.nn.CosineSimilarity(dim=-1)
    tr.roc_auc_score = capture_auc
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        off.train()
    their_loss = float(re.search(r"Rec Loss: ([0-9.eE+-]+)", out.getvalue()).group(1))

    setup = ours.configure_optimization("train", 100)
    loss = bc.train_step(ours, "train", setup, {"image": images}, 0)
    worst["loss (mean over levels, printed to 7 decimals)"] = abs(loss / len(layers) - their_loss)
    step_diff = 0.0
    for lvl, m in zip(ours.model.levels, theirs):
        mine, their_sd = _as_theirs(lvl), m.state_dict()
        assert mine.keys() == their_sd.keys()
        step_diff = max(step_diff, max(_maxdiff(mine[k], their_sd[k]) for k in mine))
    worst["every parameter after one Adam step"] = step_diff

    # 4. inference after the step: their captured pixel map (unsmoothed) and image scores
    pred = ours.predict(images)
    their_pix, their_img = captured[0].reshape(args.batch, args.size, args.size), captured[1]
    worst["pixel map after the step"] = float(np.abs(pred.maps.numpy() - their_pix).max())
    worst["image score (max of sigma-4 map)"] = float(np.abs(pred.scores.numpy() - their_img).max())

    print("| check | max abs difference | within tolerance |")
    print("| --- | ---: | --- |")
    ok = True
    for k, v in worst.items():
        good = v <= args.tol
        ok &= good
        print(f"| {k} | {v:.2e} | {'yes' if good else 'NO'} (tol {args.tol:g}) |")

    # 5. speed at the same batch and size
    def official_steps(n: int) -> float:
        off.train_loader = [batch] * n
        off.class_names, off.test_loaders = [], {}
        saver, torch.save = torch.save, (lambda *a, **k: None)  # not its checkpoint writes
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its mean over no test class
                bc.sync(device)
                t = time.perf_counter()
                off.train()
                bc.sync(device)
        finally:
            torch.save = saver
        return n / (time.perf_counter() - t)

    def official_infer(n: int) -> float:
        off.class_names, off.test_loaders = ["synthetic"], {"synthetic": [batch] * n}
        with contextlib.redirect_stdout(io.StringIO()):
            bc.sync(device)
            t = time.perf_counter()
            off.test()
            bc.sync(device)
        return n * args.batch / (time.perf_counter() - t)

    official_steps(args.warmup)
    their_train = official_steps(args.iters)
    official_infer(args.warmup)
    their_inf = official_infer(args.iters)
    ours_train = bc.rate(lambda i: bc.train_step(ours, "train", setup, {"image": images}, i), args.warmup, args.iters, device)
    ours_inf = bc.rate(lambda i: ours.predict(images), args.warmup, args.iters, device) * args.batch
    print()
    print("| code | train it/s | train img/s | inference img/s |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| public RLR (hlr7999/RLR) | {their_train:.3f} | {their_train * args.batch:.2f} | {their_inf:.2f} |")
    print(f"| this project | {ours_train:.3f} | {ours_train * args.batch:.2f} | {ours_inf:.2f} |")
    print(f"| ratio | {ours_train / their_train:.2f}x | | {ours_inf / their_inf:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
