"""CostFilter-AD: our filter step against the released code, given the same weights and input.

The released ``Costfilter_Dinomaly`` folder (github ZHE-SAPI/CostFilter-AD, not part of this
project: fetch it and pass its path) is *run*, not re-implemented: its filter network module and
its loss module are imported, and the statements of its training loop body (cost volume, guidance
map, forward, losses, backward, Adam step) and of its evaluation loop body (the blended map and the
image score) are read from its scripts with ``ast`` and executed on the same tensors our code gets.

Input: Dinomaly's two group features of a batch (``en`` / ``de``, (B, 768, 28, 28)), random
(standing in for a trained Dinomaly; the Dinomaly forward itself is not part of this check), a synthetic
mask and class labels. Both sides start from the same filter weights (ours converted from theirs
by :func:`uad.methods.costfilter.convert_official_state_dict`) and take one Adam step
(lr 1e-4, betas (0.9, 0.98)) with the ``official`` preset.

**Float64 on both sides.** The filter routes gradients through min / max over channels (the
head's min, the max pooling of the gates), so in float32 a 1e-7 difference of operation order
flips near-ties and moves gradients by up to 4e-3: a verdict at float32 depends on the thread
count. Both sides therefore run in float64 (the modules converted, the default dtype set, and the
released code's ``.float()`` calls and its ``torch.FloatTensor`` one-hot target kept at float64
for the duration of the check), where the two sides agree to ~1e-12 and no tie flips; each check
is scaled to what it compares:

* cost volume, guidance map: max abs difference (tolerance 1e-9); every loss term: the difference
  relative to its value (tolerance 1e-12);
* every parameter gradient: per tensor, max abs difference / max abs gradient (tolerance 1e-9);
  the conv biases followed by a train-mode BatchNorm have a true gradient of 0 and are checked to
  be rounding noise on both sides (|g| < 1e-9 of the largest gradient) instead;
* the *update* of every parameter by one Adam step (after minus before), relative to the step
  size lr, where |g| >= 1e-5 (tolerance 1e-9; nearer Adam's eps the update is as sensitive as the
  gradient itself, which is checked above), and no tensor updated on one side only;
* evaluation (after the step, eval mode, ours loaded with their weights after the step, so the
  forward is compared given the same weights): the logits relative to their largest magnitude
  (tolerance 1e-9; after one step they reach ~1e2 and the softmax is saturated, so P itself says
  little), then P, the blended map and the image score through the released evaluation loop with
  the logits **tempered** on both sides (the same factor brings them to [-4, 4], so P lies in
  (0.02, 0.98) and every pixel counts). Untempered, P is saturated and the map and score equal the
  released ones whatever the exact logits: reported (``info_untempered_*``), not compared.

``--wrong-filter`` scales our filter's logits (both outputs: the map's and the class adaptor's) by
1.01 and shifts them by 0.5 (a deliberately wrong implementation): the check must fail, and every row it compares must fail (exit 1); a compared row
that a wrong filter passes checks nothing (exit 2). The rows on the filter's inputs (cost volume,
guidance) and on the step's structure are not compared in that mode. ``--threads 1,2`` (default) runs the whole check once per
thread count; it passes only if every run passes.

Usage::

    python benchmarks/equiv_costfilter.py --official /path/to/CostFilter-AD/Costfilter_Dinomaly
    python benchmarks/equiv_costfilter.py --official ... --wrong-filter     # must exit 1
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import _bench_common as bc  # puts src/ on sys.path for a bare checkout

import torch
import torch.nn.functional as F
from torch import nn


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.unparse(node)
    raise KeyError(f"{name} not found in {path}")


def _loop_body(path: Path, function: str, loop_target: str, stop: str) -> str:
    """The statements of the ``for <loop_target> in ...`` loop inside ``function``, up to and
    including the first statement whose source contains ``stop``; ``if ...: continue`` skipped."""
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    loop = next(n for n in ast.walk(fn) if isinstance(n, ast.For) and ast.unparse(n.target) == loop_target)
    out = []
    for stmt in loop.body:
        if isinstance(stmt, ast.If) and any(isinstance(s, ast.Continue) for s in ast.walk(stmt)):
            continue
        src = ast.unparse(stmt)
        out.append(src)
        if stop in src:
            return "\n".join(out)
    raise KeyError(f"{stop!r} not found in the loop of {function}")


def load_official(folder: Path, device: str | torch.device = "cpu") -> dict:
    """The released code, ready to run: its filter class, loss classes, the helper functions the
    loops call, and the compiled training-loop and evaluation-loop bodies."""
    off = folder.resolve()
    sys.path.insert(0, str(off))
    if torch.device(device).type != "cuda":  # their SSIM puts its window on CUDA at construction
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    from loss import SSIM, FocalLoss_gamma, SoftIoULoss  # the released modules
    from unet3d_att_dino_channel_test_48_min import DiscriminativeSubNetwork_3d_att_dino_channel as net

    script, utils = off / "costfilter_dinomaly_mvtec_uni_my_train_test.py", off / "utils.py"
    ns: dict = {"torch": torch, "nn": nn, "F": F}
    for src, name in ((utils, "cal_anomaly_maps_28"), (utils, "cal_anomaly_maps"), (script, "compute_dynamic_gamma"),
                      (script, "weights_init_2d")):
        exec(_function_source(src, name), ns)
    train = _loop_body(script, "train", "(img, anomaly_mask, isnormal, clsname, class_labels)", "optimizer.step()")
    evaluate = _loop_body(utils, "evaluation_batch", "(img, gt, label, img_path)", "pr_list_sp.append")
    return {"ns": ns, "Net": net, "train": compile(train, "released_train_loop", "exec"),
            "eval": compile(evaluate, "released_eval_loop", "exec"), "SSIM": SSIM, "FocalLoss_gamma": FocalLoss_gamma,
            "SoftIoULoss": SoftIoULoss}


def train_env(off: dict, en, de, img, mask, labels, net, optimizer, device="cpu") -> dict:
    """The names the released training-loop body reads: the base's (en, de) output for ``img``,
    the synthetic mask and labels, the filter and its optimiser, the released loss objects."""

    class _Base(nn.Module):
        def forward(self, x):
            return en, de

    return dict(off["ns"], img=img, anomaly_mask=mask, isnormal=None, clsname=("carpet",) * len(img),
                class_labels=labels, device=device, model=_Base(), model_unet=net, optimizer=optimizer, a_=0,
                loss_focal=off["FocalLoss_gamma"](), loss_l2=nn.MSELoss(), loss_ssim=off["SSIM"](),
                criterion=nn.CrossEntropyLoss(), SoftIoULoss=off["SoftIoULoss"],
                log_losses_tensorboard=lambda *a, **k: None, writer=None)


def eval_env(off: dict, en, de, img, net, device="cpu", lamda: float = 0.05, max_ratio: float = 0.01) -> dict:
    """The names the released evaluation-loop body reads (the map lands in ``pr_list_px``, the
    image score in ``pr_list_sp``)."""
    b, size = img.shape[0], img.shape[-1]
    return dict(off["ns"], img=img, device=device, model=lambda x: (en, de), model_unet=net, lamda=lamda, a__=0,
                gt=torch.zeros(b, 1, size, size), label=torch.zeros(b), resize_mask=size, max_ratio=max_ratio,
                gt_list_px=[], pr_list_px=[], gt_list_sp=[], pr_list_sp=[])


def _feeds_batchnorm(net: nn.Module, bias_name: str) -> bool:
    """True when the conv owning ``bias_name`` is followed by a BatchNorm in its parent's
    registration order (conv -> BN pairs of the released modules)."""
    parent_name, _, leaf = bias_name.rpartition(".")
    owner_parent, _, conv = parent_name.rpartition(".")
    parent = net.get_submodule(owner_parent) if owner_parent else net
    names = [n for n, _ in parent.named_children()]
    if conv not in names:
        return False
    i = names.index(conv)
    return i + 1 < len(names) and isinstance(getattr(parent, names[i + 1]), nn.modules.batchnorm._BatchNorm)


class _Tempered(nn.Module):
    """A filter whose logits are multiplied by ``factor`` (both sides get the same factor)."""

    def __init__(self, net: nn.Module, factor: float):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, *args, **kwargs):
        logits, cls = self.net(*args, **kwargs)
        return logits * self.factor, cls


class _Wrong(nn.Module):
    """A deliberately wrong filter: its two outputs (the segmentation logits and the class-aware
    adaptor's logits) x 1.01 + 0.5."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        logits, cls = self.net(*args, **kwargs)
        return logits * 1.01 + 0.5, cls * 1.01 + 0.5


def _relmax(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_check(off: dict, args: argparse.Namespace) -> dict:
    """One full comparison in float64 at the current thread count; returns the report."""
    from uad.methods.base import Prediction
    from uad.methods.costfilter import BaseView, convert_official_state_dict
    from uad.methods.costfilter.method import CostFilter
    from uad.methods.costfilter.network import CostFilterNet, official_key_map
    from uad.methods.costfilter.volume import aligned_distance_map
    from uad.methods.common.scoring import anomaly_map_from_pairs

    torch.manual_seed(args.seed)
    b, c, g, size = args.batch, 768, 28, 392
    en = [torch.randn(b, c, g, g) for _ in range(2)]
    de = [e + 0.3 * torch.randn_like(e) for e in en]
    img = torch.randn(b, 3, size, size)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 100:180, 150:260] = 1.0
    labels = torch.randint(0, args.classes, (b,))
    lr = 1e-4

    # --- theirs: the loop body, executed ----------------------------------------------------------
    torch.manual_seed(1)
    theirs = off["Net"](in_channels=768, out_channels=2, base_channels=48).double()
    theirs.apply(off["ns"]["weights_init_2d"])
    init = {k: v.clone() for k, v in theirs.state_dict().items()}
    their_before = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    optimizer = torch.optim.Adam([{"params": theirs.parameters(), "lr": lr}], betas=(0.9, 0.98))
    env = train_env(off, en, de, img, mask, labels, theirs, optimizer)
    t0 = time.perf_counter()
    exec(off["train"], env)
    t_theirs = time.perf_counter() - t0
    their_grads = {n: p.grad.clone() for n, p in theirs.named_parameters() if p.grad is not None}
    their_after = {n: p.detach().clone() for n, p in theirs.named_parameters()}

    # --- ours: CostFilter.training_step with a base view of the same features ----------------------
    ours = CostFilter({"preset": "official", "base": "dinomaly",
                       "base_params": {"backbone": "dinov2_vitb14_reg", "weights": "random", "allow_random": True}})
    tokens = [t.flatten(2).transpose(1, 2) for t in en], [t.flatten(2).transpose(1, 2) for t in de]
    view = BaseView(tokens[0], tokens[1], tokens[0], (g, g), aligned_distance_map(*tokens, (g, g)),
                    Prediction(torch.zeros(b), torch.zeros(b, size, size)), aligned=True)
    ours.base.view = lambda images, *a, **k: view  # the frozen base's output for this batch
    core = CostFilterNet(768, 2, [768, 768], args.classes).double()
    core.load_state_dict(convert_official_state_dict(init))
    ours.net = _Wrong(core) if args.wrong_filter else core
    setup = ours.configure_optimization("filter", 100)
    ours.train_mode("filter")
    our_before = {n: p.detach().clone() for n, p in core.named_parameters()}
    t0 = time.perf_counter()
    volume, gmap = ours.volume_inputs(view)
    loss = ours.training_step("filter", {"image": img, "mask": mask, "class_id": labels}, 0)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    t_ours = time.perf_counter() - t0
    mapping = {theirs_k: ours_k for ours_k, theirs_k in official_key_map().items()}
    our_params = dict(core.named_parameters())

    report: dict = {"threads": torch.get_num_threads(), "wrong_filter": bool(args.wrong_filter)}
    checks: dict[str, tuple[float, float]] = {}  # name -> (value, tolerance)
    checks["cost_volume_abs"] = ((volume - env["anomaly_map_all_bat"]).abs().max().item(), 1e-9)
    checks["guidance_map_abs"] = ((gmap - env["min_similarity_map_all_bat"]).abs().max().item(), 1e-9)
    # losses relative to their value (float64 rounding is ~1e-15 of each term; the wrong filter
    # moves the focal term by ~4e-3 of itself)
    report["losses_theirs"] = {"total": env["loss"].item()}
    checks["loss_total_rel"] = (abs(loss.item() - env["loss"].item()) / max(abs(env["loss"].item()), 1e-12), 1e-12)
    for ours_term, their_name, w in (("focal", "Focal_loss", 1.0), ("ssim", "ssim_loss", 0.1), ("mse", "l2_loss", 1.0),
                                      ("iou", "SIOU_loss", 0.1), ("ce", "classification_loss", 0.5)):
        ref = w * float(torch.as_tensor(env[their_name]).detach())
        report["losses_theirs"][ours_term] = ref
        checks[f"loss_{ours_term}_rel"] = (abs(float(ours.terms[ours_term]) - ref) / max(abs(ref), 1e-12), 1e-12)

    # gradients, relative per tensor; conv biases before a train-mode BN: true gradient 0
    pre_bn = {n for n in their_grads if n.endswith(".bias") and _feeds_batchnorm(theirs, n)}
    gmax = max(gr.abs().max().item() for gr in their_grads.values())
    missing = [n for n in their_grads if our_params[mapping[n]].grad is None]
    if missing:
        raise RuntimeError(f"our side has no gradient for {missing[:3]}")
    rel = {n: _relmax(our_params[mapping[n]].grad, gr) for n, gr in their_grads.items() if n not in pre_bn}
    checks["grad_rel_per_tensor_max"] = (max(rel.values()), 1e-9)
    report["grad_worst_tensor"] = max(rel, key=rel.get)
    noise = max(max(our_params[mapping[n]].grad.abs().max().item(), their_grads[n].abs().max().item()) for n in pre_bn)
    checks["pre_bn_bias_grad_over_largest"] = (noise / gmax, 1e-9)
    report["grads_compared"] = len(rel)
    report["pre_bn_biases"] = len(pre_bn)

    # the update of one Adam step (after minus before), relative to lr. Adam's first update is
    # lr * g / (|g| + eps): where |g| is near eps = 1e-8 it is as sensitive to the gradient as the
    # gradient is to rounding, so elements with |g| < 1e-5 (reported) are left to the gradient check
    worst, small, total = 0.0, 0, 0
    for n, gr in their_grads.items():
        if n in pre_bn:
            continue
        ours_p = our_params[mapping[n]]
        upd_ours = ours_p.detach() - our_before[mapping[n]]
        upd_theirs = their_after[n] - their_before[n]
        defined = gr.abs() >= 1e-5
        total += gr.numel()
        small += int((~defined).sum())
        if defined.any():
            worst = max(worst, (upd_ours - upd_theirs).abs()[defined].max().item() / lr)
    checks["update_rel_lr_max"] = (worst, 1e-9)
    report["update_elements_with_gradient_below_1e-5"] = f"{small} of {total}"
    moved_theirs = {n for n in their_grads if not torch.equal(their_after[n], their_before[n])}
    moved_ours = {n for n in their_grads if not torch.equal(our_params[mapping[n]].detach(), our_before[mapping[n]])}
    checks["tensors_updated_on_one_side_only"] = (float(len(moved_theirs ^ moved_ours)), 0.0)

    # the evaluation compares the forward given the same weights: ours takes their state after
    # the step (the pre-BN biases moved by +-lr from rounding noise on each side, see above)
    core.load_state_dict(convert_official_state_dict(theirs.state_dict()))

    # --- evaluation after the step (eval mode) ------------------------------------------------------
    theirs.eval()
    ours.eval_mode()
    with torch.no_grad():
        ev = eval_env(off, en, de, img, theirs)
        exec(off["eval"], ev)
        their_logits, _ = theirs(env["anomaly_map_all_bat"], env["dino_features"], env["min_similarity_map_all_bat"])
        logits, _ = ours.filter(view)
        checks["eval_logits_rel"] = (_relmax(logits, their_logits), 1e-9)
        report["eval_logit_max_abs"] = their_logits.abs().max().item()
        report["eval_pixels_saturated"] = float((torch.softmax(their_logits, 1)[:, 1].sub(0.5).abs() > 0.49).double().mean())
        # the released evaluation feeds the guidance from the 392 px map resized to 64 (its training
        # from the 28 x 28 map; ours from the grid map in both: a deviations row). Given the map
        # their evaluation uses, ours must equal it:
        test_view = BaseView(view.queries, view.templates, view.guidance, view.grid, ev["pred_ori"][:, 0],
                             view.prediction, True)
        test_logits, _ = ours.filter(test_view)
        maps, scores = ours.output(test_logits, test_view, (size, size))
        # untempered, the softmax is saturated (logits ~1e2): P is 0 or 1 whatever the filter's
        # exact logits, so these rows cannot tell a wrong filter from the right one (measured: a
        # filter off by x1.01 + 0.5 passes them); reported, not compared. The tempered rows below
        # compare the same map and score where every pixel counts.
        report["info_untempered_eval_map_abs"] = (maps - ev["pr_list_px"][0][:, 0]).abs().max().item()
        report["info_untempered_eval_score_abs"] = (scores - ev["pr_list_sp"][0]).abs().max().item()
        # tempered: the same factor on both sides brings the logits to [-4, 4]
        factor = 4.0 / report["eval_logit_max_abs"]
        ev_t = eval_env(off, en, de, img, _Tempered(theirs, factor))
        exec(off["eval"], ev_t)
        p_theirs = F.interpolate(torch.softmax(their_logits * factor, 1), size=size, mode="bilinear", align_corners=True)[:, 1]
        p_ours = ours.probability(logits * factor, (size, size))
        checks["tempered_P_abs"] = ((p_ours - p_theirs).abs().max().item(), 1e-9)
        report["tempered_P_range"] = [p_theirs.min().item(), p_theirs.max().item()]
        maps_t, scores_t = ours.output(test_logits * factor, test_view, (size, size))
        checks["tempered_eval_map_abs"] = ((maps_t - ev_t["pr_list_px"][0][:, 0]).abs().max().item(), 1e-9)
        checks["tempered_eval_score_abs"] = ((scores_t - ev_t["pr_list_sp"][0]).abs().max().item(), 1e-9)
        # informative: our default guidance (grid map -> 64 at test time too) against their test path
        grid_maps, grid_scores = ours.output(logits * factor, view, (size, size))
        report["info_tempered_grid_guidance_vs_released_test_path_map_abs"] = (
            grid_maps - ev_t["pr_list_px"][0][:, 0]).abs().max().item()
        report["info_tempered_grid_guidance_vs_released_test_path_score_abs"] = (
            grid_scores - ev_t["pr_list_sp"][0]).abs().max().item()
        # informative: what base_map 'own' (Dinomaly's smoothed evaluation map and its score) changes
        own_map = anomaly_map_from_pairs(tokens[0], tokens[1], (g, g), (size, size), 4.0, 5)
        own_view = BaseView(view.queries, view.templates, view.guidance, view.grid, own_map,
                            Prediction(own_map.flatten(1).topk(int(0.01 * size * size), 1).values.mean(1), own_map), True)
        ours.cfg.base_map = "own"
        own_maps, own_scores = ours.output(logits, own_view, (size, size))
        ours.cfg.base_map = "cosine"
        report["info_base_map_own_vs_released_map_abs"] = (own_maps - ev["pr_list_px"][0][:, 0]).abs().max().item()
        report["info_base_map_own_vs_released_score_abs"] = (own_scores - ev["pr_list_sp"][0]).abs().max().item()
        # informative: squeeze_at_grid (the first 1x1x1 conv on the 28 x 28 grid, then the resize)
        from uad.methods.costfilter.volume import build_volume

        on_grid, _ = build_volume(view.templates, view.queries, view.grid, 768, None)
        fast_logits, _ = core(on_grid, view.guidance, env["min_similarity_map_all_bat"], view.grid)
        plain_logits, _ = core(env["anomaly_map_all_bat"], view.guidance, env["min_similarity_map_all_bat"], view.grid)
        report["info_squeeze_at_grid_logits_rel"] = _relmax(fast_logits, plain_logits)
    report["seconds_theirs_step"] = t_theirs
    report["seconds_ours_step"] = t_ours
    report["checks"] = {k: {"value": v, "tolerance": tol, "ok": v <= tol, "filter_row": k not in INPUT_ROWS}
                        for k, (v, tol) in checks.items()}
    compared = {k: c for k, c in report["checks"].items() if c["filter_row"] or not args.wrong_filter}
    report["compared"] = sorted(compared)
    report["pass"] = all(c["ok"] for c in compared.values())
    if args.wrong_filter:
        failing = sorted(k for k, c in compared.items() if not c["ok"])
        report["wrong_filter_rows_failing"] = f"{len(failing)} of {len(compared)}"
        report["wrong_filter_caught_by_every_row"] = len(failing) == len(compared)
    return report


#: rows that do not depend on what the filter computes (its inputs, and structural facts of the
#: step): a wrong filter passes them by construction, so ``--wrong-filter`` does not compare them
INPUT_ROWS = frozenset({"cost_volume_abs", "guidance_map_abs", "pre_bn_bias_grad_over_largest",
                        "tensors_updated_on_one_side_only"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="the released Costfilter_Dinomaly folder")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="1,2", help="thread counts to run the check at (all must pass)")
    ap.add_argument("--wrong-filter", action="store_true", help="scale both of our filter's logits by 1.01 and shift by 0.5: must fail")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    off = load_official(args.official)
    reports = []
    saved = torch.get_num_threads()
    for n in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n)
        with bc.float64_everywhere():
            reports.append(run_check(off, args))
    torch.set_num_threads(saved)
    out = {"pass": all(r["pass"] for r in reports), "runs": reports}
    print(json.dumps(out, indent=2))
    for r in reports:
        bad = [k for k, c in r["checks"].items() if not c["ok"]]
        print(f"threads {r['threads']}: {'PASS' if r['pass'] else 'FAIL'}" + (f" ({', '.join(bad)})" if bad else ""))
        if args.wrong_filter:
            print(f"threads {r['threads']}: wrong filter caught by {r['wrong_filter_rows_failing']} compared rows"
                  f" (inputs and structure, not compared: {', '.join(sorted(INPUT_ROWS))})")
    if args.wrong_filter and not all(r["wrong_filter_caught_by_every_row"] for r in reports):
        print("Error: a row that compares the filter's output passes with a wrong filter: it checks nothing; fix or "
              "drop it")
        sys.exit(2)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if not out["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
