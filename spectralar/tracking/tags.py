"""The names that make the record a tree: the tags every run carries, and the environment variable
that hands a stage its pipeline run."""

ROLE = "spectralar.role"
STAGE = "spectralar.stage"
PARAMS_HASH = "spectralar.params_hash"
PIPELINE_KEY = "spectralar.pipeline_key"
PIPELINE_RUN_ID = "spectralar.pipeline_run_id"
RESTORED = "spectralar.restored"
PARENT_RUN_ID = "mlflow.parentRunId"  # what makes the MLflow UI nest runs

PARENT_RUN_ENV = "SPECTRALAR_PARENT_RUN_ID"
