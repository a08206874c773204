"""The tracking vocabulary: names of tags, metrics, experiments and MLflow's size limits, in one place, for
the stages that read or write them. No MLflow here: importing it costs nothing."""
from __future__ import annotations

from typing import Any

from pipelines.services.storage.credentials import scrub

DEFAULT_REGISTERED_MODEL = "psp-encoder"
MODEL_NAME = "encoder"
"""The artifact path of a logged encoder model inside its run."""
DEFAULT_CHAMPION = "champion"

TRAIN_EXPERIMENT = "psp"
IMPORT_EXPERIMENT = "psp-imports"
INVERT_EXPERIMENT = "psp-inversions"
EDIT_EXPERIMENT = "psp-edits"

TAG_PREFIX = "psp."
RUN_NAME_TAG = "psp.ray_run_name"
VERSION_TAG = "psp.registered_version"
REGISTERED_CHECKPOINT_TAG = "psp.registered_checkpoint"
BEST_STEP_TAG = "psp.best_step"
PRESET_TAG = "psp.preset"
GIT_COMMIT_TAG = "psp.git_commit"
MANIFEST_DIGEST_TAG = "psp.shard_manifest_digest"
RANDOM_WEIGHTS_TAG = "psp.random_weights"
PRECISION_TAG = "psp.precision"
COMPILED_TAG = "psp.compiled"
MODEL_VERSION_TAG = "psp.model_version"
UNITS_SKIPPED_TAG = "psp.units_skipped"
IMAGES_WRITTEN_TAG = "psp.images_written"
NODES_TAG = "psp.nodes"
STOPPED_AT_STEP_TAG = "psp.stopped_at_step"
SOURCE_TAG = "psp.source_checkpoint"
WEIGHTS_TAG_PREFIX = "psp.weights."
"""`psp.weights.<network>`: the fingerprint (`sha256:<hex>` or `random`) of a network's starting weights."""
RANDOM = "random"

EVAL_PREFIX = "eval_"
EVAL_ARTIFACT_FOLDER = "eval"
METRICS = ("l2", "lpips", "ms_ssim", "id_similarity")
"""The per-image reconstruction metrics of an evaluation."""
COMPARABLE_METRICS = (*METRICS, "seconds_per_image")
"""The evaluation metrics `promote --if-better` can decide on (and lineage shows)."""
HIGHER_IS_BETTER = ("ms_ssim", "id_similarity")
"""Metrics where a larger value is a better reconstruction; the rest (l2, lpips, seconds) are errors or costs."""
EVAL_CONDITION_TAGS: dict[str, tuple[str, ...]] = {
    "lpips": ("eval_dataset", "eval_lpips_backbone"),
    "id_similarity": ("eval_dataset", "eval_id_backend"),
}
"""Version tags that must agree before two versions' values of a metric are comparable
(metrics not listed depend only on the data)."""

MLFLOW_PARAM_KEY_LIMIT = 250
MLFLOW_PARAM_VALUE_LIMIT = 6000
MLFLOW_BATCH_LIMIT = 100


def recorded_text(value: Any, limit: int = MLFLOW_PARAM_VALUE_LIMIT) -> str:
    """A value as MLflow records it (a param, a tag, a description): text without credentials, cut to `limit`."""
    return scrub(str(value))[:limit]


def eval_key(metric: str) -> str:
    """The version tag / run metric name of an evaluation metric (`lpips` -> `eval_lpips`)."""
    return metric if metric.startswith(EVAL_PREFIX) else EVAL_PREFIX + metric


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of this evaluation metric means a better encoder."""
    return eval_key(metric)[len(EVAL_PREFIX):] in HIGHER_IS_BETTER
