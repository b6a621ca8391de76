"""RLR, declared (no torch): read by the registry, the pipelines, the benchmark and plug-ins."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="rlr",
    module="uad.methods.rlr.method",
    stages=("train",),
    paper="He et al., Learning Unified Reference Representation for Unsupervised Multi-class Anomaly Detection, ECCV 2024",
    base_kind="reconstruction",
)
