"""uad: unsupervised industrial anomaly detection, five papers in one Kedro project."""

__version__ = "0.1.0"
