"""CostFilter-AD, declared (no torch): a plug-in over any declared base, one pipeline per pairing."""

from uad.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="costfilter",
    module="uad.methods.costfilter.method",
    stages=("filter",),
    paper="Zhang et al., CostFilter-AD: Enhancing Anomaly Detection through Matching Cost Filtering, ICML 2025",
    synthesis={"filter": "glad"},  # the released code trains the filter on GLAD's pseudo anomalies
    plugin=True,
    plugin_base_kinds=("reconstruction", "embedding"),
    plugin_features_over=("embedding",),  # over PatchCore its reference pool is a features stage
    default_base="dinomaly",  # --pipeline=costfilter: the released code's base
)
