"""Dinomaly, declared (no torch): read by the registry, the pipelines, the benchmark and plug-ins."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="dinomaly",
    module="uad.methods.dinomaly.method",
    stages=("train",),
    paper="Guo et al., Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection, CVPR 2025",
    base_kind="reconstruction",
)
