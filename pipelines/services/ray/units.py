"""The job invert and edit share: units of input (one output file each) read as one Ray block apiece, mapped
through an actor pool that holds the model, and streamed back to the driver, where each unit's rows are
gathered until the unit is complete, so a stopped run keeps every finished unit.

Each output file records in its schema metadata (`UNIT_KEY_METADATA`) the key of what it was made from
(`unit_key`: the model, the settings that change the output, the unit's input content); a rerun keeps a file
only when its recorded key is the key of the unit now (`recorded_key`), and redoes the unit otherwise."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from pipelines.services import storage
from pipelines.services.ray.cluster import ResourceRequest
from psp_core.runtime.devices import resolve_precision

UNIT_KEY_METADATA = b"psp.unit"
"""The schema-metadata key under which an output file of a unit job holds its unit's key."""
RUN_ONLY_SETTINGS = frozenset({"batch_size", "num_actors", "cpus_per_actor", "use_gpu", "compile", "compile_cache",
                               "precision"})
"""Actor-pool settings that decide where and how fast units run, not what they hold (the precision enters the
key as resolved on this hardware, `output_settings`)."""


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


def output_settings(settings: Mapping[str, Any], model_ref: str, ignored: Iterable[str] = ()) -> dict[str, Any]:
    """What decides a unit job's outputs besides each unit's input: the model, the stage's `settings` (a params
    section as JSON, plus any digests the stage adds) less the run-only ones and `ignored` (paths, reports, what
    a unit's content already covers), and the precision as the actors resolve it on this hardware."""
    device = "cuda" if settings.get("use_gpu") else "cpu"
    dropped = RUN_ONLY_SETTINGS | set(ignored)
    return {"model": model_ref, "precision": resolve_precision(settings.get("precision", "fp32"), device),
            "settings": {k: v for k, v in settings.items() if k not in dropped}}


def unit_key(settings: Mapping[str, Any], content: str) -> str:
    """The "already done" key of one output unit: a hash of `settings` (`output_settings`) and of `content`, a
    digest of the unit's input; an output file recorded under another key is stale and redone."""
    document = json.dumps({"settings": settings, "input": content}, sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def output_metadata(path: str | storage.Location) -> dict[bytes, bytes]:
    """A unit job's output file's schema metadata ({}: missing, unreadable, or none): how a stage tells its own
    files and the key each was written under."""
    try:
        return dict(storage.parquet_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return {}


def recorded_key(path: str | storage.Location) -> str | None:
    """The unit key an output file was written under (None: missing, unreadable, or not a unit job's file)."""
    value = output_metadata(path).get(UNIT_KEY_METADATA)
    return None if value is None else value.decode(errors="replace")


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
