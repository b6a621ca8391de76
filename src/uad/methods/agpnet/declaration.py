"""AGPNet, declared (no torch): read by the registry, the pipelines, the benchmark and plug-ins."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="agpnet",
    module="uad.methods.agpnet.method",
    stages=("train",),
    paper="Huang et al., Not All Regions Are Equal: Attention-Guided Perturbation Network for Industrial Anomaly Detection",
    base_kind="reconstruction",
)
