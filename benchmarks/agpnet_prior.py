"""AGPNet's CNN prior on the embedded training images (the quick profile's encoder): the energy read
after eq. 1's per-token LayerNorm (the earlier reading) against the per-stage energy before it
(the method's ``energy_map``): the spatial coefficient of variation per image and the correlation
with the energy of the unnormalised features, mean over the first 16 training images per class.

Needs ``data/02_intermediate/train_index.csv`` (``kedro run --pipeline=ingest``). Usage::

    python benchmarks/agpnet_prior.py
"""

from __future__ import annotations

import _bench_common  # noqa: F401  (puts src/ on sys.path for a bare checkout)

import numpy as np
import pandas as pd
import torch
import yaml

from uad.data.torch_data import AnomalyImageDataset
from uad.methods.agpnet.perturb import energy_map, fuse_features
from uad.methods.common.features import local_average, to_common_grid
from uad.methods.registry import build_method


def main() -> None:
    params = yaml.safe_load(open("conf/quick/parameters_agpnet.yml"))["agpnet"]["method"]
    m = build_method("agpnet", params)
    df = pd.read_csv("data/02_intermediate/train_index.csv")
    spec = m.input_spec
    rows = []
    for cls, g in df.groupby("class_name"):
        ds = AnomalyImageDataset(g.head(16).reset_index(drop=True), resize=spec["resize"], crop=spec["crop"],
                                 mean=spec["mean"], std=spec["std"])
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        with torch.no_grad():
            maps = to_common_grid([local_average(f.float(), m.cfg.cnn_pool) for f in m.encoder(x).maps], m.grid)
            feats = [f.flatten(2).transpose(1, 2) for f in maps]
            old = fuse_features(feats, "concat", "layernorm").abs().mean(-1)  # after eq. 1's LayerNorm
            new = energy_map(feats)  # per stage before it
            raw = torch.cat(feats, -1).abs().mean(-1)  # the energy of the unnormalised features

        def cv(a: torch.Tensor) -> float:
            return float((a.std(1) / a.mean(1)).mean())

        def corr(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(np.mean([np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(len(a))]))

        rows.append({"class": cls, "images": len(ds), "cv_after_norm": cv(old), "cv_before_norm (used)": cv(new),
                     "corr_after_norm_vs_raw": corr(old, raw), "corr_before_norm_vs_raw": corr(new, raw)})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
