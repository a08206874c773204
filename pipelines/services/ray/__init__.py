"""The Ray service: joining the cluster or starting a local instance sized so Ray Data never starves
(`cluster`), the watchdog that reaps a local instance with its stage (`reaper`), and the actor-pool
job invert and edit share (`units`); and the training splits of a shard folder (`splits`)."""
from pipelines.services.ray.cluster import (
    WORKER_ENV,
    ResourceRequest,
    check_local_gpus,
    check_shared_storage,
    connect,
    fit_keeping_signals,
    stage_signal_handlers,
    torch_trainer,
)
from pipelines.services.ray.splits import read_splits
from pipelines.services.ray.units import ActorPool, UnitCollector, map_units

__all__ = ["WORKER_ENV", "ActorPool", "ResourceRequest", "UnitCollector", "check_local_gpus", "check_shared_storage",
           "connect", "fit_keeping_signals", "map_units", "read_splits", "stage_signal_handlers", "torch_trainer"]
