"""Optional abilities of a method, declared by inheriting one of these mixins (never probed by name).

The engine, the training orchestration and CostFilter-AD's base adapter ask ``isinstance(method,
Capability)``; a class that declares a capability and lacks one of its methods cannot be built
(they are abstract), so a declaration is also a check.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

__all__ = ["FeatureFitting", "ReferencePool", "RescalableSchedule", "GroupReconstruction", "Reconstruction",
           "Calibrated"]


class FeatureFitting(abc.ABC):
    """Fit in one pass from frozen-encoder features that training never perturbs (PatchCore):
    the pipeline's features stage computes ``features(images)`` of every clean normal image
    once, and training calls ``fit_from_features`` with them."""

    @abc.abstractmethod
    def features(self, images: Any) -> Any:
        """Features of a normalised batch, as ``fit_from_features`` takes them."""

    @abc.abstractmethod
    def fit_from_features(self, features: Any) -> dict[str, Any]:
        """Fit from the cached features of the whole training set."""


class ReferencePool(abc.ABC):
    """A plug-in whose training reads a pool computed from clean normal images (CostFilter-AD's
    reference images over an embedding base): the features stage calls
    ``extract_train_features(dataset)``, training receives it through ``load_train_features``."""

    @abc.abstractmethod
    def extract_train_features(self, dataset: Any) -> dict[str, Any]:
        ...

    @abc.abstractmethod
    def load_train_features(self, tensors: Mapping[str, Any]) -> None:
        ...


class RescalableSchedule(abc.ABC):
    """A method whose schedule is built for its own budget and must be rebuilt when the engine
    overrides the number of iterations (``engine.iterations``)."""

    @abc.abstractmethod
    def rescale_schedule(self, setup: Any, iterations: int) -> Any:
        ...


class GroupReconstruction(abc.ABC):
    """A ViT reconstruction method read by layer groups (Dinomaly, INP-Former++):
    ``reconstruct_groups(images) -> (encoded, inputs, reconstructions)`` and the prediction made
    from them (``prediction_from(images, encoded, inputs, reconstructions)``)."""

    @abc.abstractmethod
    def reconstruct_groups(self, images: Any) -> tuple[Any, list[Any], list[Any]]:
        ...

    @abc.abstractmethod
    def prediction_from(self, images: Any, *parts: Any) -> Any:
        ...


class Reconstruction(abc.ABC):
    """A feature reconstruction method on CNN stage grids (RLR, AGPNet): ``reconstruct(images) ->
    (inputs, reconstructions)`` on the grids ``grids`` and ``prediction_from(images, inputs, recs)``."""

    grids: Any

    @abc.abstractmethod
    def reconstruct(self, images: Any) -> tuple[list[Any], list[Any]]:
        ...

    @abc.abstractmethod
    def prediction_from(self, images: Any, *parts: Any) -> Any:
        ...


class Calibrated(abc.ABC):
    """A method that fits part of its output after training on held-out normal images no model
    trained on (the ``validation`` split) and pseudo anomalies made on them (CostFilter-AD's
    calibrated blend). The training orchestration calls ``calibrate(normals, pseudo)`` after the
    last stage when ``wants_calibration``; the test split is never handed to it."""

    @property
    @abc.abstractmethod
    def wants_calibration(self) -> bool:
        ...

    @property
    def validation_recipe(self) -> str:
        """The pseudo anomalies of the validation set: ``own`` (the method's training recipe) or
        ``cutpaste`` (:mod:`uad.synthesis.cutpaste`, another family)."""
        return "own"

    @property
    def validation_copies(self) -> int:
        """Pseudo-anomalous images made from each held-out normal (different anomalies)."""
        return 1

    @abc.abstractmethod
    def calibrate(self, normals: Any, pseudo: Any) -> dict[str, Any]:
        """Fit on two datasets (clean held-out normals; the same images with pseudo anomalies);
        returns the validation figures (the chosen values among them)."""
