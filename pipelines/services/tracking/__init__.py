"""The tracking service, the one place MLflow is imported: the store (`store`), experiments and runs
(`runs`), the data a run read (`datasets`), encoders in the registry (`models`), versions, aliases and
evaluations (`registry`), the pyfunc model (`pyfunc`), the Ray Train callback (`callback`) and the
vocabulary of tags and metrics (`vocabulary`, MLflow-free). Stages call what this package exports."""
from pipelines.services.tracking.datasets import ShardDataset, dataset_context, log_datasets, shard_datasets
from pipelines.services.tracking.models import (
    ResolvedModel,
    checkpoint_opts,
    describe_version,
    import_checkpoint,
    log_encoder,
    model_checkpoint,
    registered_by,
    resolve_model,
)
from pipelines.services.tracking.registry import (
    Promotion,
    VersionRef,
    check_registry_names,
    compare_evaluations,
    parse_registry_uri,
    promote,
    record_evaluation,
    require_eval,
    resolve_version,
    version_eval,
)
from pipelines.services.tracking.runs import TrainingRun, record_job
from pipelines.services.tracking.store import (
    DEFAULT_TRACKING_URI,
    cached_artifact,
    client,
    ensure_experiment,
    fetch_weights,
    tracking_uri,
    use_tracking_store,
)
from pipelines.services.tracking.vocabulary import *  # noqa: F403 - the names of tags and metrics

__all__ = [
    "DEFAULT_TRACKING_URI", "Promotion", "ResolvedModel", "ShardDataset", "TrainingRun", "VersionRef",
    "cached_artifact", "check_registry_names", "checkpoint_opts", "client", "compare_evaluations", "dataset_context", "describe_version",
    "ensure_experiment", "fetch_weights", "import_checkpoint", "log_datasets", "log_encoder", "model_checkpoint",
    "parse_registry_uri", "promote", "record_evaluation", "record_job", "registered_by", "require_eval",
    "resolve_model", "resolve_version", "shard_datasets", "tracking_uri", "use_tracking_store", "version_eval",
]
