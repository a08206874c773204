"""Stage wiring for psp-pipeline: params, CLI, Ray, MLflow, Parquet and DVC glue (no model maths)."""
