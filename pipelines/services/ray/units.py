"""The job invert and edit share: units of input (one output file each) read as one Ray block apiece, mapped
through an actor pool that holds the model, and streamed back to the driver, where each unit's rows are
gathered until the unit is complete, so a stopped run keeps every finished unit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from pipelines.services.ray.cluster import ResourceRequest


class PoolSettings(Protocol):
    """The actor-pool settings of a stage's params section (`ActorPoolSection`)."""

    num_actors: int
    cpus_per_actor: float
    use_gpu: bool
    batch_size: int


@dataclass(frozen=True)
class ActorPool:
    """How many actors hold the model, what each reserves, and the rows each call gets."""

    size: int
    cpus: float
    use_gpu: bool
    batch_size: int

    @classmethod
    def of(cls, settings: PoolSettings) -> "ActorPool":
        """The pool a stage's settings describe."""
        return cls(settings.num_actors, settings.cpus_per_actor, settings.use_gpu, settings.batch_size)

    def request(self, section: str) -> ResourceRequest:
        """What the pool reserves, for `connect`'s check; `section` names the settings in its errors."""
        return ResourceRequest(section, self.size, self.cpus, int(self.use_gpu))


def map_units(items: list[dict[str, Any]], read: Callable[..., pa.Table], actor: type, pool: ActorPool,
              read_kwargs: Mapping[str, Any] | None = None,
              actor_kwargs: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """Each item (a dict naming its `unit`) read by `read(item_table, **read_kwargs)` in its own block, the
    rows mapped through `pool.size` actors of `actor(**actor_kwargs)`; the result batches as they finish."""
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="pyarrow", fn_kwargs=dict(read_kwargs or {}))
    mapped = dataset.map_batches(
        actor, fn_constructor_kwargs=dict(actor_kwargs or {}), compute=ActorPoolStrategy(size=pool.size),
        batch_size=pool.batch_size, batch_format="pyarrow", num_cpus=pool.cpus, num_gpus=1 if pool.use_gpu else 0)
    yield from mapped.iter_batches(batch_size=None, batch_format="pyarrow")


class UnitCollector:
    """Gathers streamed result rows by their `unit` column until a unit has its `expected` row count."""

    def __init__(self, expected: Mapping[str, int]) -> None:
        self.expected = dict(expected)
        self.pending: dict[str, list[pa.Table]] = {unit: [] for unit in expected}
        self.counts = dict.fromkeys(expected, 0)

    def add(self, batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
        """Take a result batch; yield (unit, all its rows) for each unit this batch completes."""
        for unit in sorted(set(batch.column("unit").to_pylist())):
            part = batch.filter(pc.equal(batch.column("unit"), unit))
            self.pending[unit].append(part)
            self.counts[unit] += part.num_rows
            if self.counts[unit] == self.expected[unit]:
                yield unit, pa.concat_tables(self.pending.pop(unit))

    def check_complete(self, what: str) -> None:
        """Raise if the stream ended with a unit still short of rows (a bug: nothing may be left half-written)."""
        unfinished = [u for u in self.pending if self.counts[u] < self.expected[u] or self.pending[u]]
        if unfinished:
            raise RuntimeError(f"{what} ended with incomplete output files: {unfinished[:3]}")
