"""uad: unsupervised industrial anomaly detection, five papers in one Kedro project."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from uad import Inferencer`` without importing torch for ``import uad``
    if name in ("Inferencer", "ImageResult"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'uad' has no attribute {name!r}")
