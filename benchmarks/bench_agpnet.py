"""Speed and size of AGPNet: training iterations/s, inference images/s, learnable parameters and
FLOPs, beside the paper's Table 8 (4.42 M learnable parameters, 5.63 GFLOPs, 326.65 FPS at batch
32 on one RTX 4090).

* ``train it/s``: full optimisation steps per second: the frozen encoder pass that gives features
  and the class-token attention rows, the mean teacher's attention on F_clean, A_final, the
  attention-masked image noise and the second encoder pass, both branches through the decoder as
  one batch, MSE, backward, AdamW step, and the EMA hook (an update every 10th step);
* ``infer img/s``: images per second through :meth:`AGPNet.predict` (encoder, student decoder,
  eq. 8 map upsampled to the input, pooled-max score, copy to CPU).

First, per backbone and decoder MLP ratio, the learnable parameters of the decoder and the
multiply-adds of inference per image (see :func:`size_table`; the paper's "FLOPs" are
multiply-adds of the layers, the thop count: ours at MLP ratio 4 is 5.63 G, its figure).

Weights are random (speed does not depend on them). On CUDA the method runs under bf16 autocast,
as the training engine does. Core library only (no Kedro, no MLflow).

Usage::

    python benchmarks/bench_agpnet.py --device cpu --batch 8 --infer-batch 8      # ViT-S/16 at 224
    python benchmarks/bench_agpnet.py --device cuda --batch 32 --infer-batch 32   # the paper's batch
    python benchmarks/bench_agpnet.py --backbones tf_efficientnet_lite0 --crops 128
"""

from __future__ import annotations

import sys

import _bench_common as bc  # also puts src/ on sys.path for a bare checkout

import torch
from torch.utils.flop_counter import FlopCounterMode

from uad.methods.agpnet import AGPNet

#: Table 5's backbone variants (the method README's recipes); any other name: the ViT defaults
VARIANTS = {
    "wide_resnet50_2": {"layers": [2, 3], "decoder_dim": 384},  # SimpleNet's stages, 3x3 averaged, stride 8
    "tf_efficientnet_b4": {"layers": [0, 1, 2, 3], "cnn_stride": 16, "cnn_pool": 0, "decoder_dim": 384},  # UniAD's MFCN: 24+32+56+160 = 272 ch, strides 2-16
    "tf_efficientnet_lite0": {"layers": [1, 2, 3], "cnn_stride": 8, "decoder_dim": 192},  # the quick profile
}


def make(params: dict) -> AGPNet:
    return AGPNet({**params, **VARIANTS.get(params["backbone"], {})})


def attention_macs(m: AGPNet, crop: int) -> float:
    """Multiply-adds of the attention products (q k^T and a v) of one inference forward, which
    torch's counter does not see inside the fused CPU kernel: 2 N^2 C per block."""
    total = 0.0
    if m.is_vit:
        n = (crop // m.encoder.patch_size) ** 2
        tokens = n + m.encoder.num_prefix_tokens
        total += (max(m.encoder.layers) + 1) * 2 * tokens ** 2 * m.encoder.embed_dim
    return total + len(m.decoder.blocks) * 2 * m.grid[0] * m.grid[1] * m.grid[0] * m.grid[1] * m.decoder.dim


def size_table(backbones: list[str], crops: list[int]) -> None:
    """Learnable parameters and per-image inference multiply-adds (GMACs): the layers' count by
    torch's ``FlopCounterMode`` on CPU (thop-style: linear / conv layers; the fused attention kernel
    counts 0 there) and with the attention products added."""
    print("| backbone | crop | mlp ratio | decoder params (M) | GMACs, layers only (thop-style) | GMACs with attention products |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in backbones:
        for crop in crops:
            for ratio in (4.0, 2.0):
                m = make({"backbone": name, "weights": "random", "allow_random": True, "resize": crop, "crop": crop,
                          "mlp_ratio": ratio})
                counter = FlopCounterMode(display=False)
                with counter:
                    m.predict(torch.randn(1, 3, crop, crop))
                macs = counter.get_total_flops() / 2
                print(f"| {name} | {crop} | {ratio:g} | {m.decoder_parameters() / 1e6:.2f} | {macs / 1e9:.2f} | "
                      f"{(macs + attention_macs(m, crop)) / 1e9:.2f} |")
    print()


def main(argv: list[str] | None = None) -> int:
    args = bc.common_parser(__doc__)
    args.set_defaults(backbones="dino_vits16", crops="224")
    ns = args.parse_args(argv)
    size_table([b.strip() for b in ns.backbones.split(",") if b.strip()], [int(c) for c in ns.crops.split(",")])
    return bc.bench_method(make, "bench_agpnet.py", __doc__, argv,
                           defaults={"backbones": "dino_vits16", "crops": "224"})


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
