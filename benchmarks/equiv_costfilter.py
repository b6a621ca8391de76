"""CostFilter-AD: our filter step against the released code, given the same weights and input.

The released ``Costfilter_Dinomaly`` folder (github ZHE-SAPI/CostFilter-AD, not part of this
project: fetch it and pass its path) is *run*, not re-implemented: its filter network module and
its loss module are imported, and the statements of its training loop body (cost volume, guidance
map, forward, losses, backward, Adam step) and of its evaluation loop body (the blended map) are
read from its scripts with ``ast`` and executed on the same tensors our code gets.

Input: Dinomaly's two group features of a batch (``en`` / ``de``, (B, 768, 28, 28)), random
(standing in for a trained Dinomaly: our Dinomaly already equals the official one), a synthetic
mask and class labels. Both sides start from the same filter weights (ours converted from theirs
by :func:`uad.methods.costfilter.convert_official_state_dict`) and take one Adam step
(lr 1e-4, betas (0.9, 0.98)) with the ``official`` preset.

Compared (max abs difference, tolerance 1e-4): cost volume, guidance map, every loss term and the
total, every parameter gradient, every parameter after the step, and the evaluation map
(lambda-blend). Two kinds of elements are reported apart, because neither side defines them: a
conv bias followed by a train-mode BatchNorm (true gradient 0; both sides compute rounding noise),
and a parameter element whose gradient is within the two sides' float32 disagreement (Adam's first
step is ~lr * sign(g) there). The gradients are only comparable when the forward arithmetic is the
same operation for operation: the filter routes gradients through min / max over channels, so a
1e-7 change of the input (another op order) can flip a near-tie and move a gradient by 1e-3; this
is why the default path keeps the released order (``squeeze_at_grid`` is forward-checked only).
Usage::

    python benchmarks/equiv_costfilter.py --official /path/to/CostFilter-AD/Costfilter_Dinomaly
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

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
    evaluate = _loop_body(utils, "evaluation_batch", "(img, gt, label, img_path)", "anomaly_maps = anomaly_maps1 * lamda")
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


def eval_env(off: dict, en, de, img, net, device="cpu", lamda: float = 0.05) -> dict:
    """The names the released evaluation-loop body reads."""
    return dict(off["ns"], img=img, device=device, model=lambda x: (en, de), model_unet=net, lamda=lamda, a__=0)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="the released Costfilter_Dinomaly folder")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    off = load_official(args.official)

    from uad.methods.base import Prediction
    from uad.methods.costfilter import BaseView, convert_official_state_dict
    from uad.methods.costfilter.method import CostFilter

    torch.manual_seed(args.seed)
    b, c, g, size = args.batch, 768, 28, 392
    en = [torch.randn(b, c, g, g) for _ in range(2)]
    de = [e + 0.3 * torch.randn_like(e) for e in en]
    img = torch.randn(b, 3, size, size)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 100:180, 150:260] = 1.0
    labels = torch.randint(0, args.classes, (b,))

    # --- theirs: the loop body, executed ----------------------------------------------------------
    torch.manual_seed(1)
    theirs = off["Net"](in_channels=768, out_channels=2, base_channels=48)
    theirs.apply(off["ns"]["weights_init_2d"])
    init = {k: v.clone() for k, v in theirs.state_dict().items()}
    optimizer = torch.optim.Adam([{"params": theirs.parameters(), "lr": 0.0001}], betas=(0.9, 0.98))
    env = train_env(off, en, de, img, mask, labels, theirs, optimizer)
    t0 = time.perf_counter()
    exec(off["train"], env)
    t_theirs = time.perf_counter() - t0
    their_grads = {n: p.grad.clone() for n, p in theirs.named_parameters() if p.grad is not None}
    their_after = {k: v.clone() for k, v in theirs.state_dict().items()}

    # --- ours: CostFilter.training_step with a base view of the same features ----------------------
    ours = CostFilter({"preset": "official", "base": "dinomaly",
                       "base_params": {"backbone": "dinov2_vitb14_reg", "weights": "random", "allow_random": True}})
    to_tokens = [t.flatten(2).transpose(1, 2) for t in en], [t.flatten(2).transpose(1, 2) for t in de]
    from uad.methods.costfilter.volume import aligned_distance_map

    view = BaseView(to_tokens[0], to_tokens[1], to_tokens[0], (g, g), aligned_distance_map(*to_tokens, (g, g)),
                    Prediction(torch.zeros(b), torch.zeros(b, size, size)), aligned=True)
    ours.base.view = lambda images, *a, **k: view  # the frozen base's output for this batch
    from uad.methods.costfilter.network import CostFilterNet

    ours.net = CostFilterNet(768, 2, [768, 768], args.classes)
    ours.net.load_state_dict(convert_official_state_dict(init))
    setup = ours.configure_optimization("filter", 100)
    ours.train_mode("filter")
    t0 = time.perf_counter()
    volume, gmap, _ = ours.volume_inputs(view)
    loss = ours.training_step("filter", {"image": img, "mask": mask, "class_id": labels}, 0)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    t_ours = time.perf_counter() - t0
    mapping = {theirs_k: ours_k for ours_k, theirs_k in
               __import__("uad.methods.costfilter.network", fromlist=["official_key_map"]).official_key_map().items()}
    our_params = dict(ours.net.named_parameters())
    our_state = ours.net.state_dict()

    report: dict[str, float] = {}
    report["cost_volume"] = (volume - env["anomaly_map_all_bat"]).abs().max().item()
    report["guidance_map"] = (gmap - env["min_similarity_map_all_bat"]).abs().max().item()
    report["loss_total"] = abs(loss.item() - env["loss"].item())
    for ours_term, their_name, w in (("focal", "Focal_loss", 1.0), ("ssim", "ssim_loss", 0.1), ("mse", "l2_loss", 1.0),
                                      ("iou", "SIOU_loss", 0.1), ("ce", "classification_loss", 0.5)):
        report[f"loss_{ours_term}"] = abs(ours.terms[ours_term] - w * float(env[their_name]))
    # A conv bias followed by a train-mode BatchNorm has a true gradient of 0 (BN removes the
    # mean): both sides compute ~1e-9 of rounding noise there, which Adam's g / sqrt(v) turns into
    # a full +-lr step of either sign. Those tensors are reported apart.
    pre_bn = {n for n in their_grads if n.endswith(".bias") and _feeds_batchnorm(theirs, n)}
    diff = {n: (our_params[mapping[n]].grad - gr).abs().max().item() for n, gr in their_grads.items()}
    report["grad_max"] = max(diff[n] for n in diff if n not in pre_bn)
    report["grad_max_pre_bn_bias"] = max((diff[n] for n in pre_bn), default=0.0)
    after = {k: (our_state[mapping[k]].float() - v.float()).abs().max().item() for k, v in their_after.items() if k in mapping}
    report["param_after_step_max_all"] = max(v for k, v in after.items() if k not in pre_bn)
    report["param_after_step_pre_bn_bias"] = max((after[k] for k in pre_bn), default=0.0)
    report["grads_compared"] = len(their_grads)
    report["pre_bn_biases"] = len(pre_bn)
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): an element whose gradient is within
    # the two sides' float32 disagreement (|g| <= 10 x the tensor's largest gradient difference,
    # itself ~1e-6) has no defined sign and moves by +-lr on either side. The step is compared
    # where the gradient's sign is defined; the rest are counted.
    worst, noisy, total = 0.0, 0, 0
    for n, gr in their_grads.items():
        if n in pre_bn:
            continue
        d = (our_params[mapping[n]].detach() - their_after[n]).abs()
        well = gr.abs() > 10 * (our_params[mapping[n]].grad - gr).abs().max()
        total += gr.numel()
        noisy += int((~well).sum())
        if well.any():
            worst = max(worst, d[well].max().item())
    report["param_after_step_max"] = worst
    report["param_elements_at_gradient_noise"] = f"{noisy} of {total}"

    # --- the evaluation map (after the step; eval mode) ------------------------------------------
    theirs.eval()
    ours.net.eval()
    ev = eval_env(off, en, de, img, theirs)
    with torch.no_grad():
        exec(off["eval"], ev)
        logits, _, base_map = ours.filter(view)
        mine = ours.output_map(logits, base_map, (size, size))
    report["eval_map_their_test_guidance"] = (mine - ev["anomaly_maps"][:, 0]).abs().max().item()
    # their evaluation feeds the guidance map from the 392 px map resized to 64 (training: from the
    # 28 x 28 map); with their training-path guidance the filter maps agree:
    with torch.no_grad():
        their_logits, _ = theirs(env["anomaly_map_all_bat"], env["dino_features"], env["min_similarity_map_all_bat"])
        p = F.interpolate(torch.softmax(their_logits, 1), size=size, mode="bilinear", align_corners=True)[:, 1]
        their_map = 0.05 * p + 0.95 * ev["pred_ori"][:, 0]
    report["eval_map"] = (mine - their_map).abs().max().item()
    # squeeze_at_grid (the first 1x1x1 conv before the resize; exact math, other float rounding)
    from uad.methods.costfilter.volume import build_volume

    with torch.no_grad():
        on_grid, _ = build_volume(view.templates, view.queries, view.grid, 768, None)
        fast_logits, _ = ours.net(on_grid, view.guidance, env["min_similarity_map_all_bat"], view.grid)
    report["squeeze_at_grid_logits"] = (fast_logits - their_logits).abs().max().item()
    report["squeeze_at_grid_logits_relative"] = report["squeeze_at_grid_logits"] / their_logits.abs().max().item()
    report["seconds_theirs_step"] = t_theirs
    report["seconds_ours_step"] = t_ours
    tol = 1e-4
    checked = ["cost_volume", "guidance_map", "loss_total", "loss_focal", "loss_ssim", "loss_mse", "loss_iou", "loss_ce",
               "grad_max", "param_after_step_max", "eval_map"]
    report["pass"] = all(report[k] <= tol for k in checked)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not report["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
