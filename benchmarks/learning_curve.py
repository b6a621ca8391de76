"""Image and pixel AUROC against training steps, measured in one training run of a pipeline's method.

The method is built from the project's configuration (``--env``, plus ``--params`` overrides of
its ``method`` block) exactly as ``kedro run --pipeline=<pipeline>`` builds it, trained by the
engine on the same training set (pseudo anomalies included where the method trains on them), and
scored on the test split at each budget of ``--budgets`` (optimisation steps). Scoring does not
touch the training: it draws no random numbers, and both methods this is used for keep a schedule
that does not depend on the total budget (RLR: constant-rate Adam; CostFilter-AD: the plateau
scheduler stepped per natural epoch, ``epochs`` large enough for the last budget), so the point at
``s`` steps is what a run of ``s`` steps gives.

A plug-in's curve also shows its filter's input as a detector (the volume's min-cost map).
``--templates`` (RLR only) adds three training-free references on the same frozen features and the
same map and score formula: the per-position mean of all training images' features, the
per-position mean of the test image's own class (an oracle: it reads the class), and the nearest
training token (any position, any image).

A plug-in (``costfilter_<base>``) reads its base's latest checkpoint from the catalog, as the
pipeline does; its base's own metrics are drawn as a horizontal line. Needs ``train_index`` and
``test_index`` (run ``kedro run --pipeline=ingest`` with the same ``--env`` first).

CostFilter-AD's ``calibrated`` preset (``--params preset=calibrated``): at every budget the blend is
fitted as the pipeline fits it after training (on ``validation_index``, the held-out normals, and
pseudo anomalies made on them: :func:`uad.engine.orchestration.calibrate_method`), then the test
images are scored once and taken apart: P alone, the base alone and the calibrated blend, on the
same images; the validation figures (the chosen weight, the blend's, P's and the base's validation
AUROC) are recorded beside them.

Usage::

    python benchmarks/learning_curve.py --pipeline rlr --budgets 75,150,300,600,1200 --templates \\
        --out docs/figures/rlr_steps_auroc
    python benchmarks/learning_curve.py --pipeline costfilter_patchcore --params epochs=64 \\
        --budgets 64,128,256,512,1024 --out docs/figures/costfilter_paper_steps_auroc

Writes ``<out>.json`` (every figure, the machine, the command) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _session_params(env: str) -> tuple[dict, object]:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    session = KedroSession.create(project_path=ROOT, env=env)
    ctx = session.load_context()
    return ctx.params, ctx.catalog


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _metrics(labels, scores, masks, maps, classes) -> dict[str, float]:
    from uad.metrics import compute_metrics

    table = compute_metrics(labels, scores, masks.astype(bool), maps, classes, pixel=True)
    mean = table.loc["mean"]
    return {k: float(mean[k]) for k in ("image_auroc", "pixel_auroc", "pixel_aupro") if k in mean}


def rlr_templates(method, train_ds, test_ds, test_df) -> dict[str, dict[str, float]]:
    """Training-free templates through RLR's own map (eq. 15-16) and score (max of the sigma-4 map)."""
    from uad.methods.common.scoring import gaussian_blur
    from uad.methods.rlr.losses import anomaly_map, token_distance

    def tokens(ds) -> tuple[list[torch.Tensor], np.ndarray]:
        levels: list[list[torch.Tensor]] = []
        ids = []
        for i in range(0, len(ds), 16):
            batch = [ds[j] for j in range(i, min(i + 16, len(ds)))]
            imgs = torch.stack([torch.as_tensor(b["image"]) for b in batch])
            ids += [int(b["class_id"]) for b in batch]
            for lvl, t in enumerate(method.encode(imgs.to(method.device))):
                if len(levels) <= lvl:
                    levels.append([])
                levels[lvl].append(t.float().cpu())
        return [torch.cat(lv) for lv in levels], np.asarray(ids)

    train_tok, train_cls = tokens(train_ds)
    test_tok, test_cls = tokens(test_ds)
    size = tuple(method.input_spec["crop"] for _ in range(2))

    def evaluate(templates: list[torch.Tensor]) -> dict[str, float]:
        maps = anomaly_map(templates, test_tok, method.grids, size, method.cfg.distance)
        smooth = gaussian_blur(maps[:, None], method.cfg.score_sigma, None, padding="reflect")[:, 0]
        scores = smooth.flatten(1).max(dim=1).values
        masks = np.stack([np.asarray(test_ds[i]["mask"])[0] for i in range(len(test_ds))]) > 0.5
        return _metrics(test_df["label"].to_numpy(), scores.numpy(), masks, maps.numpy(), test_df["class_name"].to_numpy())

    out = {}
    out["per-position mean, all classes"] = evaluate([t.mean(0, keepdim=True).expand_as(q) for t, q in zip(train_tok, test_tok)])
    own = []
    for t, q in zip(train_tok, test_tok):
        means = {c: t[train_cls == c].mean(0) for c in np.unique(train_cls)}
        own.append(torch.stack([means[int(c)] for c in test_cls]))
    out["per-position mean, own class (oracle)"] = evaluate(own)
    nearest = []
    for t, q in zip(train_tok, test_tok):
        bank = t.reshape(-1, t.shape[-1])  # every training token of the level
        best = torch.empty_like(q)
        for i in range(q.shape[0]):
            qi = q[i]  # N, C
            d2 = (qi.pow(2).sum(1, keepdim=True) + bank.pow(2).sum(1)[None] - 2 * qi @ bank.T) / qi.shape[1]
            cos = torch.nn.functional.normalize(qi, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
            best[i] = bank[(d2.clamp_min(0) + 1 - cos).argmin(dim=1)]
        nearest.append(best)
    out["nearest training token"] = evaluate(nearest)
    # the same distance token_distance gives (checked on one level: the formula is shared)
    d, c = token_distance(nearest[0][:1], test_tok[0][:1], method.cfg.distance)
    assert torch.isfinite(d).all() and torch.isfinite(c).all()
    return out


@torch.no_grad()
def costfilter_input_map(method, test_ds, test_df) -> dict[str, float]:
    """The filter's own input as a detector: the volume's initial map (eq. 2: per layer the minimum
    cost over the matching axis, averaged over layers), bilinearly upsampled, scored with the
    filter's image-score rule. What the paper preset's filter has to improve on: it never sees the
    base's map."""
    from uad.methods.costfilter.volume import cost_matrix

    method.eval_mode()
    maps, masks = [], []
    for i in range(0, len(test_ds), 8):
        items = [test_ds[j] for j in range(i, min(i + 8, len(test_ds)))]
        x = torch.stack([b["image"] for b in items]).to(method.device)
        view = method.base.view(x)
        q, t = (view.templates, view.queries) if method.cfg.query_side == "template" else (view.queries, view.templates)
        initial = torch.stack([cost_matrix(a, b, method.cfg.cost_eps).min(-1).values for a, b in zip(q, t)]).mean(0)
        grid_map = initial.reshape(-1, 1, *view.grid)
        maps.append(torch.nn.functional.interpolate(grid_map, size=x.shape[-2:], mode="bilinear", align_corners=True)[:, 0].cpu())
        masks += [np.asarray(b["mask"])[0] > 0.5 for b in items]
    maps_t = torch.cat(maps)
    scores = method.image_score(maps_t)
    return _metrics(test_df["label"].to_numpy(), scores.numpy(), np.stack(masks), maps_t.numpy(),
                    test_df["class_name"].to_numpy())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="rlr, agpnet, ... or costfilter_<base>")
    ap.add_argument("--env", default="quick")
    ap.add_argument("--params", nargs="*", default=[], help="overrides of the method block: key=value")
    ap.add_argument("--budgets", required=True, help="optimisation steps to score at, ascending")
    ap.add_argument("--templates", action="store_true", help="RLR: the training-free template rows")
    ap.add_argument("--out", required=True, type=Path, help="output stem (.json and .png are written)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    budgets = sorted(int(b) for b in args.budgets.split(","))

    from uad.engine import EngineConfig, Trainer
    from uad.methods.registry import build_method
    from uad.engine.orchestration import (
        compose_plugin_params,
        method_dataset as _dataset,
        resolve_synthesis_spec,
        synthesis_augment as _synthesis_augment,
    )
    from uad.engine.scoring import score_dataset

    params, catalog = _session_params(args.env)
    ns = args.pipeline
    base_name = ns.split("_", 1)[1] if ns.startswith("costfilter_") else None
    method_name = "costfilter" if base_name else ns
    method_params = {**dict(params[ns].get("method") or {}), **_parse_overrides(args.params)}
    if base_name:
        method_params = compose_plugin_params(method_params, base_name, params[base_name].get("method") or {})
    engine = EngineConfig.from_params({**params["engine"], "checkpoint_dir": None, "resume": False,
                                       "log_every": 1, "progress": True})
    train_index, test_index = catalog.load("train_index"), catalog.load("test_index")
    validation_index = catalog.load("validation_index")
    normal, labelled = train_index[train_index["label"] == 0], train_index[train_index["label"] == 1]
    classes = sorted(train_index["class_name"].unique())

    method = build_method(method_name, method_params)
    base_info = {}
    ckpt = None
    if base_name:
        from uad.methods.registry import method_class

        key = f"{base_name}.checkpoint_{method_class(base_name).stages[-1]}"
        ckpt = catalog.load(key)
        method.load_base(ckpt["tensors"], ckpt.get("meta"), ckpt.get("path"))
        base_info = {"checkpoint": str(ckpt.get("path") or key)}
    stage = method.stages[-1]
    if len(method.stages) != 1:
        raise SystemExit(f"{ns}: one training stage expected, got {method.stages}")
    # the spec the pipeline's synthesis node would write (one model for all classes: group None)
    spec = resolve_synthesis_spec(method_name, train_index, params.get("data") or {}, params.get("synthesis") or {},
                                  engine.seed)
    aug, _ = _synthesis_augment(method, stage, normal, labelled, spec, engine.seed, None)
    train_ds = _dataset(method, normal, classes, augment=aug)
    test_ds = _dataset(method, test_index, classes)
    labels, test_classes = test_index["label"].to_numpy(), test_index["class_name"].to_numpy()

    points: list[dict] = []
    base_metrics: dict[str, float] | None = None
    t_start = time.perf_counter()
    train_seconds = [0.0]
    last = [time.perf_counter()]

    calibrated = method_name == "costfilter" and bool(method.cfg.calibrate)

    def calibrated_point(done: int, loss: float) -> dict:
        """Fit the blend on the validation split as the pipeline does, then P alone, the base and
        the blend on the same test images (one forward). Beside it, the other choosers on the same
        filter (each recipe of the validation's pseudo anomalies, with and without the bootstrap
        test) and the weights a sweep on the test split itself would pick (an upper bound no run
        may use: it says whether any weight could lift the base at this budget)."""
        from uad.data.index import content_fingerprint
        from uad.engine.orchestration import calibrate_method
        from uad.methods.costfilter.calibration import best_weight, blend, region_guard
        from uad.methods.costfilter.config import CALIBRATION_RECIPES

        t0 = time.perf_counter()
        out = method.validation_outputs(test_ds, 8)
        masks = out.masks.numpy()

        def test_metrics(cal_weights: tuple[float, float], cal) -> dict:
            wm, wsc = cal_weights
            return _metrics(labels, blend(out.p_scores, out.base_scores, wsc, cal.score_affine).numpy(), masks,
                            blend(out.p_maps, out.base_maps, wm, cal.map_affine).numpy(), test_classes)

        configured = method.cfg.calibration_recipe
        variants, kept = {}, None
        for recipe in [r for r in CALIBRATION_RECIPES if r != configured] + [configured]:
            method.cfg.calibration_recipe = recipe
            figures = calibrate_method(method, method_name, validation_index, None, classes, spec, engine.seed, ckpt,
                                       content_fingerprint(train_index))
            cal = method.calibration
            # the same validation curve without the bootstrap test: the best weight beating the base by min_gain
            ws = [c[0] for c in figures["curve"]]
            curve = figures["curve"]
            unguarded = [best_weight(region_guard([c[2] for c in curve], [c[3] for c in curve], ws,
                                                  method.cfg.blend_min_gain), ws, method.cfg.blend_min_gain)[0],
                         best_weight([c[1] for c in curve], ws, method.cfg.blend_min_gain)[0]]  # map, score
            variants[recipe] = {
                "weights": [cal.map_weight, cal.score_weight], "test": test_metrics((cal.map_weight, cal.score_weight), cal),
                "weights_without_bootstrap": unguarded, "test_without_bootstrap": test_metrics(tuple(unguarded), cal),
                "validation": {k: v for k, v in figures.items() if k != "curve"}, "validation_curve": figures["curve"]}
            kept = figures
        figures = kept  # the configured recipe's calibration stays on the method (the pipeline's output)
        cal = method.calibration
        # the test split swept (an upper bound, never an input of the method): per weight, the
        # score and the map blended at that weight, each figure the mean over classes as in the table
        sweep = []
        for w in method.cfg.blend_candidates:
            m = test_metrics((w, w), cal)
            sweep.append([w, m["image_auroc"], m["pixel_auroc"], m["pixel_aupro"]])
        parts = {"p": (out.p_scores, out.p_maps), "base": (out.base_scores, out.base_maps),
                 "blend": (blend(out.p_scores, out.base_scores, cal.score_weight, cal.score_affine),
                           blend(out.p_maps, out.base_maps, cal.map_weight, cal.map_affine))}
        row = {"steps": done, "loss": loss, "train_seconds": round(train_seconds[0], 1),
               "validation": {k: v for k, v in figures.items() if k != "curve"},
               "validation_curve": figures["curve"], "variants": variants, "test_sweep": sweep,
               "test_sweep_note": "per weight [w, image AUROC, pixel AUROC, AUPRO] on the test split, each the mean "
                                  "over classes; an upper bound, not used to choose"}
        for name, (sc, mp) in parts.items():
            row[name] = _metrics(labels, sc.numpy(), masks, mp.numpy(), test_classes)
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        row.update(row["blend"])  # the pipeline's output at this budget
        return row

    def on_log(stage_name: str, done: int, loss: float) -> None:
        nonlocal base_metrics
        if done not in budgets:
            return
        train_seconds[0] += time.perf_counter() - last[0]
        if calibrated:
            row = calibrated_point(done, loss)
            base_metrics = row["base"]
            points.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("validation_curve", "variants", "test_sweep")}),
                  flush=True)
            method.train_mode(stage_name)
            last[0] = time.perf_counter()
            if done >= budgets[-1]:
                raise _Done
            return
        base: dict[str, list] = {}
        scores, maps, masks = score_dataset(method, test_ds, trainer, engine, f"{ns}@{done}", base=base)
        row = {"steps": done, "loss": loss, "train_seconds": round(train_seconds[0], 1),
               **_metrics(labels, scores, masks, maps, test_classes)}
        if base and base_metrics is None:
            base_metrics = _metrics(labels, np.concatenate(base["scores"]), masks,
                                    np.concatenate(base["maps"]).astype(np.float32), test_classes)
        points.append(row)
        print(json.dumps(row), flush=True)
        method.train_mode(stage_name)
        last[0] = time.perf_counter()
        if done >= budgets[-1]:
            raise _Done

    class _Done(Exception):
        pass

    trainer = Trainer(engine, on_log=on_log)
    trainer.prepare(method)
    loader = trainer.loader(train_ds, batch_size=engine.batch_size or int(method.config.batch_size))
    total = method.iterations_for(len(train_ds)) if engine.iterations is None else engine.iterations
    if total < budgets[-1]:
        if method_name == "costfilter":
            raise SystemExit(f"{ns}: {total} steps in {method.cfg.epochs} epochs < {budgets[-1]}; raise --params epochs=...")
        engine.iterations = budgets[-1]  # a constant-rate method: the budget is only where it stops
    try:
        method.fit_stage(stage, loader, trainer)
    except _Done:
        pass

    templates = None
    if args.templates:
        method.eval_mode()
        templates = rlr_templates(method, _dataset(method, normal, classes), test_ds, test_index)
        for k, v in templates.items():
            print(json.dumps({"template": k, **v}), flush=True)

    filter_input = None
    if method_name == "costfilter":
        filter_input = costfilter_input_map(method, test_ds, test_index)
        print(json.dumps({"filter input (the volume's min-cost map)": filter_input}), flush=True)

    report = {
        "pipeline": ns, "env": args.env, "method_params": {k: v for k, v in method_params.items() if k != "base_params"},
        "budgets": budgets, "points": points, "base": base_metrics, "base_info": base_info, "templates": templates,
        "filter_input": filter_input,
        "calibration_recipe": method.cfg.calibration_recipe if calibrated else None,
        "n_train": len(train_ds), "n_test": len(test_ds), "batch_size": loader.batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
                   f"torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'no GPU'}",
        "date": time.strftime("%Y-%m-%d"), "wall_seconds": round(time.perf_counter() - t_start, 1),
        "command": "python benchmarks/learning_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


def plot(report: dict, path: Path) -> None:
    if report["points"] and "blend" in report["points"][0]:
        return plot_calibrated(report, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    steps = [p["steps"] for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), constrained_layout=True)
    for ax, key, title in ((axes[0], "image_auroc", "image AUROC"), (axes[1], "pixel_auroc", "pixel AUROC")):
        ax.plot(steps, [p[key] for p in pts], "o-", color="C0", lw=2, label=report["pipeline"])
        for x, p in zip(steps, pts):
            ax.annotate(f"{p[key]:.3f}", (x, p[key]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        if report.get("base"):
            base_name = report["pipeline"].split("_", 1)[1]
            ax.axhline(report["base"][key], color="C3", ls="--", label=f"its base ({base_name}): {report['base'][key]:.3f}")
        refs = dict(report.get("templates") or {})
        if report.get("filter_input"):
            refs["the filter's input: its volume's min-cost map"] = report["filter_input"]
        for i, (name, vals) in enumerate(refs.items()):
            ax.axhline(vals[key], color=f"C{i + 1}", ls=":", label=f"{name}: {vals[key]:.3f}")
        ax.axhline(0.5, color="0.6", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel(f"optimisation steps (batch {report['batch_size']}, {report['n_train']} training images)")
        ax.set_ylabel(title)
        lows = [p[key] for p in pts] + [v[key] for v in refs.values()]
        ax.set_ylim(min(0.4, min(lows) - 0.05), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        ax.set_title(f"{title}, mean over classes")
    fig.suptitle(f"{report['pipeline']} ({report['env']} profile, embedded dataset): AUROC against training steps\n"
                 f"{report['machine']}, {report['date']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibrated(report: dict, path: Path) -> None:
    """CostFilter-AD's calibrated preset: on the test images P alone, the base and the blend; on
    the validation set (held-out normals + pseudo anomalies) P alone and the blend; the weight the
    validation chose at each budget written under the blend's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    steps = [p["steps"] for p in pts]
    base_name = report["pipeline"].split("_", 1)[1]
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.4))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.86, bottom=0.27, wspace=0.2)
    for ax, key, vkey, title in ((axes[0], "image_auroc", "image_auroc", "image AUROC"),
                                 (axes[1], "pixel_auroc", "pixel_auroc", "pixel AUROC"),
                                 (axes[2], "pixel_aupro", "pixel_aupro", "AUPRO (FPR <= 0.3)")):
        ax.plot(steps, [p["blend"][key] for p in pts], "o-", color="C0", lw=2.2, label="calibrated blend (test)")
        for x, p in zip(steps, pts):
            wkey = "score_weight" if key == "image_auroc" else "map_weight"
            ax.annotate(f"{p['blend'][key]:.3f}\nw={p['validation'][wkey]:g}", (x, p["blend"][key]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7.5)
        ax.plot(steps, [p["p"][key] for p in pts], "s-", color="C1", lw=1.6, label="P alone (test)")
        ax.plot(steps, [p["base"][key] for p in pts], "--", color="C3", lw=1.6, label=f"base alone, {base_name} (test)")
        other = [r for r in (pts[0].get("variants") or {}) if r != report.get("calibration_recipe", "own")]
        for r in other:
            ax.plot(steps, [p["variants"][r]["test_without_bootstrap"][key] for p in pts], "x-.", color="C4", lw=1.2,
                    label=f"blend chosen on the {r} recipe, no bootstrap (test)")
        ax.plot(steps, [p["validation"].get(f"val_{vkey}", np.nan) for p in pts], "o:", color="C0", alpha=0.6,
                label="calibrated blend (validation)")
        ax.plot(steps, [p["validation"].get(f"val_p_{vkey}", np.nan) for p in pts], "s:", color="C1", alpha=0.6,
                label="P alone (validation)")
        ax.axhline(0.5, color="0.6", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel(f"optimisation steps (batch {report['batch_size']}, {report['n_train']} training images)")
        ax.set_ylabel(title)
        lows = [p[part][key] for p in pts for part in ("p", "base", "blend")]
        lows += [v for p in pts for v in (p["validation"].get(f"val_{vkey}"), p["validation"].get(f"val_p_{vkey}"))
                 if v is not None and np.isfinite(v)]
        ax.set_ylim(max(0.0, min(0.4, min(lows) - 0.05)), 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}, mean over classes")
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, fontsize=8.5, loc="lower center", ncol=3, frameon=False)
    recipe = report.get("calibration_recipe", "own")  # reports before the recipe was a setting: the filter's own
    fig.suptitle(f"{report['pipeline']}, calibrated preset ({report['env']} profile, embedded dataset): P, base and "
                 f"blend against training steps\nvalidation = held-out normals + their {recipe} pseudo anomalies (never "
                 f"the test split); {report['machine']}, {report['date']}", fontsize=9.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
