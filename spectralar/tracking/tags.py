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
PARAMS_DIGEST = "spectralar.params_digest"  # pipeline run: hash of the whole resolved params file

# MLflow's own tags (mlflow.utils.mlflow_tags), which the UI shows as User, Source and Version; the
# client API leaves them empty unless they are set, as the fluent API does.
MLFLOW_USER = "mlflow.user"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
# The experiment's kind: "custom_model_development" makes MLflow 3's UI open it on its runs table
# (without it the UI may open on the GenAI "Traces" page, where these runs do not appear).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
