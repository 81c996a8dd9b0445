"""Trained models as MLflow models: ``mlflow.pytorch.log_model`` with a signature taken from a small
example, so that ``mlflow.pytorch.load_model(uri)`` gives the module back (the ``spectralar``
package must be importable where it is loaded: its classes are pickled by name)."""

from __future__ import annotations

from typing import Any, Mapping, Union

Example = Union[Any, Mapping[str, Any]]  # a tensor or array, or named tensors


def _numpy(value: Example):
    if isinstance(value, Mapping):
        return {name: _numpy(item) for name, item in value.items()}
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def log_torch_model(client, uri: str, run_id: str, name: str, model, inputs: Example, outputs: Example) -> str:
    """Log ``model`` under ``name`` in run ``run_id``; its signature is that of ``inputs`` -> ``outputs``
    (an example call the caller made). Returns the model's URI (``models:/<model id>``)."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    signature = infer_signature(_numpy(inputs), _numpy(outputs))
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    mlflow.set_tracking_uri(uri)
    # The model API logs into the active run: resume this one, then put its status back, since
    # ending the fluent run marks it FINISHED before the stage is done (the stage run ends it).
    with mlflow.start_run(run_id=run_id):
        # pickle (not the traced 'pt2' graph of forward): the loaded module keeps every method (decode).
        info = mlflow.pytorch.log_model(model, name=name, signature=signature, pip_requirements=requirements,
                                        serialization_format="pickle")
    client.update_run(run_id, status="RUNNING")
    return info.model_uri
