"""Sizing a job's actors or workers on the live Ray cluster, and whether it can hold them, before they start.

Every Ray job sizes here: CPU actors share their nodes' cores beside the CPU Ray Data's tasks need
(`DATA_CPU_RESERVE`), GPU pools default to the cluster's GPUs. Ray queues an actor that no node can place and
waits for it without end; so do Ray Data (for its pool's minimum actors) and Ray Train (for its workers'
placement group). The jobs check their pools here first, and fail with the pool and the cluster in the message
instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import ray

from genre_pipeline.errors import JobInputError

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0
# What a job allows for its actors or workers to start (and, on a joined cluster, for their nodes to appear):
# room for a GPU node provisioned from zero and its image pulled, and for every actor to load the model.
DEFAULT_START_TIMEOUT_SECONDS = 900.0
# Ray keeps resource amounts with 4 decimals: a sum of float shares may land a hair below a whole.
EPSILON = 1e-6
# Ray Data runs some tasks that need one whole CPU (repartition, not configurable) beside a job's actors or
# workers: the actors on a CPU node leave that much free, or the job waits forever.
DATA_CPU_RESERVE = 1.0

T = TypeVar("T")


class ClusterResourcesError(JobInputError, ValueError):
    """Actors or workers the cluster cannot hold, or could not start in time: the job would wait forever."""


@dataclass(frozen=True)
class NodeResources:
    """What Ray offers on one live node (logical resources: what it was started with, not what is free)."""

    cpus: float
    gpus: float = 0.0

    def describe(self) -> str:
        return " + ".join(amount(value, unit) for value, unit in ((self.cpus, "CPU"), (self.gpus, "GPU"))
                          if value) or "no CPU"


@dataclass(frozen=True)
class Pool:
    """`count` processes (actors, workers) reserving `cpus` and `gpus` each, beside `spare_cpus` that must stay
    free on some node (Ray Data's tasks that need a whole CPU)."""

    name: str  # what one process is: "label actor", "Ray Train worker"
    count: int
    cpus: float
    gpus: float = 0.0
    spare_cpus: float = 0.0

    def describe(self) -> str:
        each = " and ".join(amount(value, unit) for value, unit in ((self.gpus, "GPU"), (self.cpus, "CPU")) if value)
        plural = self.count != 1
        return f"{self.count} {self.name}{'s' if plural else ''} of {each or 'no resources'}{' each' if plural else ''}"


@dataclass(frozen=True)
class ActorResources:
    """An actor pool's size: how many actors, and what each one gets."""

    actors: int
    cpus: float  # what Ray reserves for each actor
    threads: int  # intra-op threads (and, where the actor decodes, decode threads) of each actor


def amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'' if value == 1 else 's'}"


def live_nodes() -> list[NodeResources]:
    return [NodeResources(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
            for node in ray.nodes() if node.get("Alive")]


def node_cpus(nodes: Sequence[NodeResources]) -> list[float]:
    """The CPU counts of the nodes that have CPUs."""
    return [node.cpus for node in nodes if node.cpus]


def gpu_pool_size(nodes: Sequence[NodeResources], gpus_per_actor: float) -> int:
    """How many actors of `gpus_per_actor` the nodes' GPUs hold (at least one: check_pool then says why not)."""
    return max(1, int(sum(node.gpus for node in nodes) / gpus_per_actor + EPSILON))


def size_cpu_actors(actors: int | None, nodes: Sequence[float], *, max_actors: int | None = None,
                    cpus: float | None = None, threads: int | None = None, min_cpus: float = 0.0, work: str = "run",
                    advice: str = "", error: Callable[[str], Exception] = ClusterResourcesError) -> ActorResources:
    """CPU actors spread evenly over nodes of these CPU counts, sized for the smallest: they share its CPUs less
    DATA_CPU_RESERVE (each at least `min_cpus`), and its cores in threads (Ray Data's tasks are mostly waiting).

    `actors` None: one single-threaded actor per core, but no more than `max_actors` (an actor without work only
    costs start-up). Separate actors never wait on each other, while an actor's threads meet at every layer, so
    another process taking one core stalls its whole forward pass (docs/performance.md). `cpus` and `threads`,
    when given, are each actor's. A node too small to share raises `error`, naming the `work` and the `advice`.
    """
    if not nodes:
        raise error(f"no live Ray node has CPUs to {work} on (give the cluster CPU workers)")
    smallest = min(nodes)
    if smallest <= DATA_CPU_RESERVE:
        raise error(
            f"a {smallest:g}-CPU node cannot {work} on CPUs: Ray Data's read tasks need {DATA_CPU_RESERVE:g} whole "
            f"CPU and the actors the rest; give every node at least {DATA_CPU_RESERVE + 1:g} CPUs{advice}")
    if actors is None:
        cores = len(nodes) * int(smallest)
        actors = cores if max_actors is None else max(1, min(cores, max_actors))
    per_node = actors_per_node(actors, nodes)
    return ActorResources(actors, cpus or max(min_cpus, (smallest - DATA_CPU_RESERVE) / per_node),
                          threads or max(1, round(smallest / per_node)))


def actors_per_node(actors: int, nodes: Sequence[float]) -> int:
    """The most actors one node holds when `actors` are spread evenly over the nodes."""
    return math.ceil(actors / len(nodes))


def places_on(node: NodeResources, pool: Pool, spare_cpus: float = 0.0) -> int:
    """How many of the pool's processes fit on `node` with `spare_cpus` left over (-1: not even those)."""
    if node.cpus + EPSILON < spare_cpus:
        return -1
    limits = [math.floor(have / need + EPSILON) for have, need in ((node.cpus - spare_cpus, pool.cpus),
                                                                   (node.gpus, pool.gpus)) if need > 0]
    return min(limits) if limits else pool.count


def shortfall(pool: Pool, nodes: Sequence[NodeResources]) -> str | None:
    """Why the pool cannot be placed on these nodes, or None when it can."""
    gpus, cpus = sum(node.gpus for node in nodes), sum(node.cpus for node in nodes)
    if pool.gpus and gpus + EPSILON < pool.count * pool.gpus:
        return f"{pool.describe()}: the cluster has {amount(gpus, 'GPU')}"
    beside = f" beside the {amount(pool.spare_cpus, 'CPU')} Ray Data's tasks need" if pool.spare_cpus else ""
    if cpus + EPSILON < (needed := pool.count * pool.cpus + pool.spare_cpus):
        return f"{pool.describe()}{beside} ({amount(needed, 'CPU')} in all): the cluster has {amount(cpus, 'CPU')}"
    places = [places_on(node, pool) for node in nodes]
    on_nodes = f"the live nodes ({'; '.join(node.describe() for node in nodes)})"
    if sum(places) < pool.count:
        return f"{pool.describe()}: only {sum(places)} fit on {on_nodes}"
    if pool.spare_cpus and not any(sum(places) - own + places_on(node, pool, pool.spare_cpus) >= pool.count
                                   for node, own in zip(nodes, places, strict=True)
                                   if places_on(node, pool, pool.spare_cpus) >= 0):
        return f"{pool.describe()}{beside}: no node of {on_nodes} keeps those free once they are placed"
    return None


def check_pool(pool: Pool, nodes: Sequence[NodeResources], *, advice: str = "",
               error: type[ClusterResourcesError] = ClusterResourcesError) -> None:
    """Raise `error` (the pool, the cluster, and `advice`) when the pool cannot be placed on these nodes."""
    reason = shortfall(pool, nodes)
    if reason:
        raise error(f"{reason}: the job would wait forever" + (f"; {advice}" if advice else ""))


def within(seconds: float, attempt: Callable[[], T]) -> T:
    """`attempt()` until it no longer raises ClusterResourcesError, for at most `seconds` (then its error): a
    joined cluster's nodes may still be starting (KubeRay worker pods, a GPU node being provisioned)."""
    deadline = time.monotonic() + seconds
    waiting = False
    while True:
        try:
            return attempt()
        except ClusterResourcesError as error:
            if time.monotonic() >= deadline:
                raise
            if not waiting:
                logger.warning("waiting up to %.0f s for the cluster's nodes: %s", seconds, error)
                waiting = True
        time.sleep(POLL_SECONDS)
