"""The review station: a local web page where an inspection engineer scores images with a trained
model, looks at each map, sets the image threshold while seeing what it costs, marks images normal
or defective, and turns those marks into the next training run (``kedro review``).

Kedro / MLflow layer. Every score comes from :class:`uad.inference.Inferencer` (the one inference
path); the thresholds are saved as a new version of the catalog's ``<method>.thresholds`` dataset
and recorded in MLflow; marks are written into a dataset folder in the MVTec layout the project
ingests.

* :mod:`.model` — which trained model (latest of a method, a checkpoint version, an MLflow model
  or a model folder), its thresholds, and the held-out scores the threshold's cost is read on;
* :mod:`.store` — the images on screen (uploads and folders, one entry each whatever their names)
  and the reviewed dataset they are marked into;
* :mod:`.app` — the web application (FastAPI) and its security rules;
* :mod:`.command` — ``kedro review``.
"""
