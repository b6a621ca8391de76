"""The released Dinomaly code's speed, timed as ``bench_dinomaly.py`` times ours: same sizes, batch,
warm-up and timing, random weights, one process, one device.

Issue 12 asks that this project be no slower than the official code at any size or backbone. This
script builds the released model as its ``dinomaly_mvtec_uni.py`` does (DINOv2-R encoder from the
released ``dinov2`` package, ``bMlp`` bottleneck with dropout 0.2, 8 ``Block`` decoder layers with
``LinearAttention2``, ``ViTill`` with target layers 2..9 and two fused groups, StableAdamW + warm-up
cosine, ``global_cosine_hm_percent`` at p = 0.9, grad-norm clip 0.1, ``loss.item()`` every step)
and times:

* ``train it/s``: one training iteration of the released loop body;
* ``infer img/s``: the GPU part of the released ``evaluation_batch``: forward, ``cal_anomaly_maps``,
  the resize to 256 it evaluates at, the 5 x 5 Gaussian, the top-1 % score (maps stay on the
  device, as there until the end of the test set).

``--precision fp32`` is the code as released; ``bf16`` wraps the same loop bodies in bf16 autocast
(what the issue also measured). Weights are random (no download; speed does not depend on them).

The released repository is not part of this project: fetch it and pass its folder. Modules it
imports only for its metrics and plots (scikit-learn, OpenCV, scikit-image, matplotlib, pandas,
SciPy, ptflops, tabulate, colorama) are replaced by empty stand-ins when absent, since none of them runs in the timed
code: the accelerator machine has only torch, timm and torchvision.

Usage::

    python benchmarks/bench_official_dinomaly.py --official /path/to/Dinomaly --device cuda \\
        --backbones vitb,vits --crops 392,224 --batch 16 --infer-batches 16,64 --precision fp32
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
from functools import partial

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

import torch
from torch import nn

ARCH = {"vits": ("vit_small", 384, 6), "vitb": ("vit_base", 768, 12), "vitl": ("vit_large", 1024, 16)}
_ALIASES = {"dinov2_vits14_reg": "vits", "dinov2_vitb14_reg": "vitb", "dinov2_vitl14_reg": "vitl"}


class _Absent(types.ModuleType):
    """An importable stand-in: any attribute is a placeholder that fails only if called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*_a, **_k):
            raise RuntimeError(f"{self.__name__}.{name} is not installed here (only metrics/plots use it)")

        return missing


@contextlib.contextmanager
def _stand_ins(absent: list[str]):
    """Empty stand-ins for the modules the released code imports but the timed code never runs,
    only while its modules are imported (then removed, so nothing else sees them)."""
    import torch._dynamo  # noqa: F401 - loaded first: it probes optional modules and must see the real ones

    added = []
    for name in ("sklearn", "sklearn.metrics", "sklearn.cluster", "cv2", "skimage", "skimage.measure", "matplotlib",
                 "matplotlib.pyplot", "pandas", "scipy", "scipy.ndimage", "scipy.interpolate", "ptflops", "tabulate",
                 "colorama"):
        root = name.split(".")[0]
        if name in sys.modules or (root not in absent and importlib.util.find_spec(root) is not None):
            continue
        stub = _Absent(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = stub
        added.append(name)
        if root not in absent:
            absent.append(root)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def build_official(size: str, device: torch.device, absent: list[str]):
    """The released model, optimiser, schedule and the functions its loops call."""
    with _stand_ins(absent):
        from dinov2.models import vision_transformer as v2
        from models.uad import ViTill
        from models.vision_transformer import Block, LinearAttention2, bMlp
        from optimizers.StableAdamW import StableAdamW
        from utils import WarmCosineScheduler, cal_anomaly_maps, get_gaussian_kernel, global_cosine_hm_percent

    arch, dim, heads = ARCH[size]
    encoder = getattr(v2, arch)(patch_size=14, img_size=518, block_chunks=0, init_values=1e-8, num_register_tokens=4,
                                interpolate_antialias=False, interpolate_offset=0.1)
    layers = [4, 6, 8, 10, 12, 14, 16, 18] if size == "vitl" else [2, 3, 4, 5, 6, 7, 8, 9]
    bottleneck = nn.ModuleList([bMlp(dim, dim * 4, dim, drop=0.2)])
    decoder = nn.ModuleList(Block(dim=dim, num_heads=heads, mlp_ratio=4., qkv_bias=True,
                                  norm_layer=partial(nn.LayerNorm, eps=1e-8), attn=LinearAttention2) for _ in range(8))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    model = ViTill(encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=layers, mask_neighbor_size=0,
                   fuse_layer_encoder=groups, fuse_layer_decoder=groups).to(device)
    trainable = nn.ModuleList([bottleneck, decoder])
    opt = StableAdamW([{"params": trainable.parameters()}], lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4,
                      amsgrad=True, eps=1e-10)
    sched = WarmCosineScheduler(opt, base_value=2e-3, final_value=2e-4, total_iters=10000, warmup_iters=100)
    kernel = get_gaussian_kernel(kernel_size=5, sigma=4).to(device)
    return model, trainable, opt, sched, kernel, global_cosine_hm_percent, cal_anomaly_maps


def main(argv: list[str] | None = None) -> int:
    ap = bc.common_parser(__doc__)
    ap.add_argument("--official", required=True, help="folder of the released Dinomaly repository")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    run = bc.setup_run(args)
    sys.path.insert(0, args.official)
    absent: list[str] = []
    print(bc.header(run, "bench_official_dinomaly.py", argv))
    print()
    infer_batches = [int(b) for b in str(args.infer_batches or run.infer_batch).split(",") if b.strip()]
    cols = "".join(f" infer img/s @{b} |" for b in infer_batches)
    print(f"| backbone | crop | train batch | train it/s | train img/s |{cols}")
    print("|" + " --- |" * (5 + len(infer_batches)))
    amp = (lambda: torch.autocast(run.device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    for name in run.backbones:
        size = _ALIASES.get(name, name)
        for crop in run.crops:
            model, trainable, opt, sched, kernel, loss_fn, maps_fn = build_official(size, run.device, absent)
            x = torch.randn(run.batch, 3, crop, crop, device=run.device)

            def train(i: int) -> float:
                model.train()
                with amp():
                    en, de = model(x)
                    loss = loss_fn(en, de, p=0.9, factor=0.1)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)
                opt.step()
                value = loss.item()  # the released loop reads the loss every step
                sched.step()
                return value

            r = bc.rate(train, run.warmup, run.iters, run.device, run.pipelined)
            cells = f" {r:.3f} | {r * run.batch:.2f} |"
            model.eval()
            for b in infer_batches:
                t = torch.randn(b, 3, crop, crop, device=run.device)

                @torch.no_grad()
                def infer(i: int) -> torch.Tensor:
                    with amp():
                        en, de = model(t)
                    amap, _ = maps_fn(en, de, t.shape[-1])
                    amap = kernel(torch.nn.functional.interpolate(amap, size=256, mode="bilinear", align_corners=False))
                    flat = amap.flatten(1)
                    return torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * 0.01)].mean(dim=1)

                cells += f" {bc.rate(infer, run.warmup, run.iters, run.device, run.pipelined) * b:.2f} |"
            print(f"| {name} | {crop} | {run.batch} |{cells}", flush=True)
            del model, trainable, opt, sched
            bc.release(run)
    print()
    print(f"released code: {args.official}; precision {args.precision} (as released: fp32)"
          + (f"; stand-ins for absent metric/plot modules: {', '.join(absent)}" if absent else ""))
    print(bc.footer(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
