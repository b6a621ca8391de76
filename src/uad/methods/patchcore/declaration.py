"""PatchCore, declared (no torch): read by the registry, the pipelines, the benchmark and plug-ins."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="patchcore",
    module="uad.methods.patchcore.method",
    stages=("fit",),
    paper="Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022",
    features_stage=True,  # one pass over frozen features that training never perturbs: cached by a features node
    base_kind="embedding",  # a plug-in's templates are nearest normal images by frozen-encoder features
)
