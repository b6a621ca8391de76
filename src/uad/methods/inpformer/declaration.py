"""INP-Former++, declared (no torch): read by the registry, the pipelines, the benchmark and plug-ins."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="inpformer",
    module="uad.methods.inpformer.method",
    stages=("reconstruction", "residual"),
    paper="Luo et al., INP-Former++: Advancing Universal Anomaly Detection via Intrinsic Normal Prototypes and Residual Learning",
    # the residual stage learns from DRAEM-style pseudo anomalies; the reconstruction stage sees normals only
    synthesis={"residual": "draem"},
    base_kind="reconstruction",
)
