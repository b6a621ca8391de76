"""CostFilter-AD speed: filter training it/s and inference img/s at the paper's size, ours next to
the released Dinomaly-base filter (run from its own files, as in ``equiv_costfilter.py``).

Size: Dinomaly ViT-B/14 at 392 -> two 28 x 28 x 768 group features, D = 768 matching channels,
64 x 64 volume, base width 48, 15 classes, batch 12 (the released training batch). Both sides
get the same features (the frozen base's output: random here, its cost is the base's own and is
reported separately with ``--with-base``) and start from the same weights.

Ours runs as the pipeline runs it: the ``official`` preset, bf16 autocast on CUDA
(``--precision bf16``), ``cudnn.benchmark``; ``--squeeze-at-grid`` adds the first-conv-on-the-grid
path. Theirs runs as released (fp32, ``cudnn.deterministic``). The report gives the max difference
of our inference map from theirs on the same weights (the bf16 error when bf16 is on).

    python benchmarks/bench_costfilter.py --official /path/to/Costfilter_Dinomaly --device cuda
    python benchmarks/bench_costfilter.py --device cpu --batch 2 --steps 2   # ours only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, default=None, help="the released Costfilter_Dinomaly folder (optional)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--squeeze-at-grid", action="store_true")
    ap.add_argument("--with-base", action="store_true", help="also time our frozen Dinomaly ViT-B base forward (random weights)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if (args.precision == "bf16" and device.type == "cuda") else None

    from uad.methods.base import Prediction
    from uad.methods.costfilter import BaseView
    from uad.methods.costfilter.method import CostFilter
    from uad.methods.costfilter.network import CostFilterNet
    from uad.methods.costfilter.volume import aligned_distance_map

    torch.manual_seed(0)
    b, c, g, size = args.batch, 768, 28, 392
    en = [torch.randn(b, c, g, g, device=device) for _ in range(2)]
    de = [e + 0.3 * torch.randn_like(e) for e in en]
    img = torch.randn(b, 3, size, size, device=device)
    mask = torch.zeros(b, 1, size, size, device=device)
    mask[:, :, 100:180, 150:260] = 1.0
    labels = torch.randint(0, 15, (b,), device=device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "batch": b, "precision_ours": args.precision if autocast else "fp32",
                    "squeeze_at_grid": bool(args.squeeze_at_grid), "threads": torch.get_num_threads()}

    # --- ours --------------------------------------------------------------------------------------
    torch.backends.cudnn.benchmark = True
    ours = CostFilter({"preset": "official", "base": "dinomaly", "squeeze_at_grid": bool(args.squeeze_at_grid),
                       "base_params": {"backbone": "dinov2_vitb14_reg", "weights": "random", "allow_random": True}})
    ours.to(device, autocast)
    tokens = [t.flatten(2).transpose(1, 2) for t in en], [t.flatten(2).transpose(1, 2) for t in de]
    view = BaseView(tokens[0], tokens[1], tokens[0], (g, g), aligned_distance_map(*tokens, (g, g)),
                    Prediction(torch.zeros(b), torch.zeros(b, size, size)), aligned=True)
    ours.base.view = lambda images, *a, **k: view
    torch.manual_seed(1)
    ours.net = CostFilterNet(768, 2, [768, 768], 15).to(device)
    init = {k: v.clone() for k, v in ours.net.state_dict().items()}
    setup = ours.configure_optimization("filter", 1000)
    batch = {"image": img, "mask": mask, "class_id": labels}

    def our_step():
        ours.train_mode("filter")
        with ours.autocast():
            loss = ours.training_step("filter", batch, 0)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()

    def our_infer():
        ours.eval_mode()
        with torch.no_grad():
            logits, _ = ours.filter(view)
            return ours.output(logits, view, (size, size))[0]

    t = _timed(our_step, args.steps, args.warmup, device)
    report["ours_train_it_s"] = 1.0 / t
    t = _timed(our_infer, args.steps, args.warmup, device)
    report["ours_infer_img_s"] = b / t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        our_step()
        report["ours_train_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

    if args.with_base:
        from uad.methods.registry import build_method

        base = build_method("dinomaly", {"backbone": "dinov2_vitb14_reg", "weights": "random", "allow_random": True})
        base.to(device, autocast)
        base.eval_mode()
        t = _timed(lambda: base.reconstruct_groups(img), args.steps, args.warmup, device)
        report["ours_base_forward_img_s"] = b / t

    # --- theirs ------------------------------------------------------------------------------------
    if args.official is not None:
        from equiv_costfilter import eval_env, load_official, train_env

        from uad.methods.costfilter.network import official_key_map

        off = load_official(args.official, device)
        torch.backends.cudnn.benchmark = False  # their setup_seed
        torch.backends.cudnn.deterministic = True
        theirs = off["Net"](in_channels=768, out_channels=2, base_channels=48).to(device)
        theirs.load_state_dict({**theirs.state_dict(), **{t: init[o] for o, t in official_key_map().items()}})
        optimizer = torch.optim.Adam([{"params": theirs.parameters(), "lr": 0.0001}], betas=(0.9, 0.98))
        env = train_env(off, en, de, img, mask, labels, theirs, optimizer, device)
        t = _timed(lambda: exec(off["train"], env), args.steps, args.warmup, device)
        report["theirs_train_it_s"] = 1.0 / t
        theirs.eval()
        ev = eval_env(off, en, de, img, theirs, device)

        def their_infer():
            with torch.no_grad():
                exec(off["eval"], ev)

        t = _timed(their_infer, args.steps, args.warmup, device)
        report["theirs_infer_img_s"] = b / t
        report["speedup_train"] = report["ours_train_it_s"] / report["theirs_train_it_s"]
        report["speedup_infer"] = report["ours_infer_img_s"] / report["theirs_infer_img_s"]
        # equal outputs: both networks in eval mode on the same (stepped) weights
        ours.net.load_state_dict({o: theirs.state_dict()[t] for o, t in official_key_map().items()})
        mine = our_infer()
        their_infer()
        report["infer_map_max_diff"] = (mine.float() - ev["anomaly_maps"][:, 0].float()).abs().max().item()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
