"""The Kedro and MLflow layer: the only package of ``uad`` that imports kedro, kedro-mlflow or mlflow.

- ``pipelines/``: the pipelines and their thin nodes (each node turns parameters into arguments and
  calls one core function);
- ``io/``: the catalog's dataset classes;
- ``hooks/``: one module per hook;
- ``cli.py``: ``kedro run`` with one-line errors (``uad.cli`` is Kedro's entry point to it);
- ``mlflow_model.py``: the servable MLflow pyfunc;
- ``kedro_internals.py``: the fence, the one module that touches private Kedro / kedro-mlflow names.

Everything else under ``src/uad`` is the core library (torch / numpy), which imports none of this.
"""
