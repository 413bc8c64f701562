"""The KV store's tiers as the simulator models them (docs/sim.md, "KV store tiers"; the live store:
docs/kv_store.md, kv/store/).

Each tier is an LRU of block hashes within a byte budget (``block_bytes``: the whole model's KV of one block,
as the live KV manager sizes blocks). The host-memory and disk tiers are one per host, shared by the
instances on it (instances fill hosts in order, pool by pool, ``cards_per_host`` cards each); the remote
tier is one for the cluster. Lookups and loads walk the tiers as ``kv.store.tiers.TieredStore`` does: the
host tier for the leading blocks it holds, then the disk tier for the next ones, then the remote one, round
again while any tier found more. A load takes each tier's blocks over its bandwidth (per card, times the
instance's cards, as each rank loads its shard) and copies blocks from the slower tiers into the host tier;
a save writes the blocks a tier lacks to every tier, one tier after the other.

What is not modelled: the live router's store index lags by the workers' event interval (here it is
exact); per-operation latencies; the remote server's own eviction policy (an LRU here too).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

TIERS = ("host", "disk", "remote")
DEFAULT_HOST_GBS = 25.0  # an accelerator card's host link (PCIe Gen4 x16 in practice, per direction)
DEFAULT_DISK_GBS = 3.0  # an NVMe drive, per host
UNBOUNDED = 1 << 62  # a remote store at a URL, without a size (kv_remote_memory), holds everything
STARTED_REMOTE_BYTES = 2 * 2**30  # the server `pdserve up` starts (kv_remote: redis | mooncake), by default


@dataclass(frozen=True)
class StoreSpec:
    """The tiers' budgets (bytes; 0: tier off; host and disk per host, remote for the cluster) and the
    planning-only figures: load/save bandwidth per tier in GB/s per card (None: the default of the card,
    docs/sim.md) and the cards a host holds (None: the card's node_size, a CPU entry's num_cores)."""

    host_bytes: int = 0
    disk_bytes: int = 0
    remote_bytes: int = 0
    save_queue_bytes: int = 0  # a worker's saves in flight beyond it are dropped (kv_save_queue; 0: a quarter
    # of its KV cache, config.save_queue_bytes)
    host_gbs: float | None = None
    disk_gbs: float | None = None
    remote_gbs: float | None = None
    cards_per_host: int | None = None

    def __post_init__(self) -> None:
        if min(self.host_bytes, self.disk_bytes, self.remote_bytes, self.save_queue_bytes) < 0:
            raise ValueError("KV store sizes must be >= 0")
        for name in ("host_gbs", "disk_gbs", "remote_gbs"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"kv store {name} must be > 0, got {v}")
        if self.cards_per_host is not None and self.cards_per_host < 1:
            raise ValueError(f"kv store cards_per_host must be >= 1, got {self.cards_per_host}")

    @property
    def enabled(self) -> bool:
        return bool(self.host_bytes or self.disk_bytes or self.remote_bytes)

    @classmethod
    def from_settings(cls, settings: dict, planning: dict | None = None) -> StoreSpec:
        """From a cluster file's ``serving.kv_store`` (`pdserve up`'s names, sizes parsed or not) and its
        ``planning.kv_store`` (host_gbs, disk_gbs, remote_gbs, cards_per_host)."""
        from pdserve.config import parse_size
        from pdserve.settings import store_config

        settings = dict(settings)
        remote_memory = settings.pop("kv_remote_memory", None)
        config = store_config(**settings)
        remote = 0
        if config.remote and remote_memory is None:  # `pdserve up` starts a server of 2 GiB by default
            remote = STARTED_REMOTE_BYTES if "://" not in config.remote else UNBOUNDED
        elif config.remote:
            remote = parse_size(remote_memory) if isinstance(remote_memory, str) else int(remote_memory)
        planning = dict(planning or {})
        unknown = sorted(set(planning) - {"host_gbs", "disk_gbs", "remote_gbs", "cards_per_host"})
        if unknown:
            raise ValueError(f"planning.kv_store: unknown key(s) {unknown}")
        return cls(config.host_memory_bytes, config.disk_bytes if config.disk else 0, remote,
                   config.save_queue_bytes, **planning)


@dataclass
class TierStats:
    looked_up: int = 0  # blocks asked of the tier at admission
    found: int = 0  # ... and found there
    loaded: int = 0  # blocks loaded from it
    saved: int = 0  # blocks written to it
    evicted: int = 0

    def as_dict(self, block_bytes: int) -> dict:
        return {"looked_up_blocks": self.looked_up, "found_blocks": self.found,
                "hit_rate": self.found / self.looked_up if self.looked_up else None,
                "loaded_blocks": self.loaded, "loaded_bytes": self.loaded * block_bytes,
                "saved_blocks": self.saved, "evicted_blocks": self.evicted}


class Tier:
    """An LRU of block hashes holding at most ``capacity`` blocks."""

    def __init__(self, name: str, capacity: int, stats: TierStats) -> None:
        self.name, self.capacity, self.stats = name, capacity, stats
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def prefix(self, hashes: Sequence[int], start: int) -> int:
        """How many of ``hashes[start:]``, from the first, the tier holds."""
        n = start
        blocks = self._blocks
        while n < len(hashes) and hashes[n] in blocks:
            n += 1
        return n - start

    def touch(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._blocks.move_to_end(h)

    def put(self, hashes: Sequence[int]) -> None:
        """Store the blocks (those held already become the most recent), evicting the least recent."""
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
                continue
            if self.capacity < 1:
                return
            blocks[h] = None
            self.stats.saved += 1
            if len(blocks) > self.capacity:
                blocks.popitem(last=False)
                self.stats.evicted += 1


@dataclass
class Placement:
    """Where the instances are: the host of each (instance id -> host index)."""

    hosts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fill(cls, instances: Sequence, cards_per_host: int) -> Placement:
        """Instances in order, each ``pool.tp`` cards, fill hosts of ``cards_per_host`` cards (an instance
        never spans two hosts: one that does not fit the rest of a host starts the next)."""
        hosts, host, used = {}, 0, 0
        for inst in instances:
            cards = inst.pool.tp
            if used and used + cards > cards_per_host:
                host, used = host + 1, 0
            hosts[inst.instance_id] = host
            used += cards
        return cls(hosts)


def tier_gbs(spec: StoreSpec, hardware) -> dict[str, float]:
    """Each tier's load/save bandwidth per card, GB/s: the spec's, else the host tier a CPU entry's
    ``intra_node_gbs`` (a shared-memory copy) or an accelerator's host link (``DEFAULT_HOST_GBS``), the disk
    ``DEFAULT_DISK_GBS``, the remote tier the card's network (``inter_node_gbs`` times its efficiency)."""
    host = hardware.intra_node_gbs if hardware.num_cores else DEFAULT_HOST_GBS
    remote = hardware.inter_node_gbs * hardware.efficiency.network
    return {"host": spec.host_gbs or host, "disk": spec.disk_gbs or DEFAULT_DISK_GBS,
            "remote": spec.remote_gbs or remote}


class SimStore:
    """The cluster's tiers: ``num_hosts`` host and disk tiers (where configured), one remote tier."""

    def __init__(self, spec: StoreSpec, block_bytes: int, num_hosts: int) -> None:
        self.spec, self.block_bytes = spec, max(1, int(block_bytes))
        sizes = (spec.host_bytes, spec.disk_bytes, spec.remote_bytes)
        self.stats = {t: TierStats() for t, size in zip(TIERS, sizes) if size}
        cap = {t: size // self.block_bytes for t, size in zip(TIERS, sizes)}
        self._host = [Tier("host", cap["host"], self.stats["host"]) for _ in range(num_hosts)] \
            if spec.host_bytes else None
        self._disk = [Tier("disk", cap["disk"], self.stats["disk"]) for _ in range(num_hosts)] \
            if spec.disk_bytes else None
        self._remote = Tier("remote", cap["remote"], self.stats["remote"]) if spec.remote_bytes else None
        self.loaded_tokens = 0  # prompt tokens that loads brought in (block_size each block)
        self.dropped_saves = 0  # finished requests whose save did not fit the save queue (kv_save_queue), or
        # fitted only in part (its leading blocks saved)

    def tiers(self, host: int) -> list[Tier]:
        """The tiers a worker on ``host`` reaches, fastest first."""
        out = []
        if self._host is not None:
            out.append(self._host[host])
        if self._disk is not None:
            out.append(self._disk[host])
        if self._remote is not None:
            out.append(self._remote)
        return out

    def _walk(self, host: int, hashes: Sequence[int], count: bool) -> list[tuple[Tier, int, int]]:
        """(tier, first, count) runs of the leading blocks of ``hashes`` the tiers hold, in the live order."""
        tiers = self.tiers(host)
        runs, n = [], 0
        stopped: dict[str, int] = {}  # where each tier's last run ended (asked there again: the same answer)
        while n < len(hashes):
            start = n
            for tier in tiers:
                if n >= len(hashes) or stopped.get(tier.name) == n:
                    continue
                k = tier.prefix(hashes, n)
                stopped[tier.name] = n + k
                if count:
                    tier.stats.looked_up += len(hashes) - n
                    tier.stats.found += k
                if k:
                    runs.append((tier, n, k))
                    n += k
            if n == start:
                break
        return runs

    def peek(self, host: int, hashes: Sequence[int], start: int = 0) -> int:
        """How many of ``hashes[start:]``, from the first, a worker on ``host`` could load (no counting)."""
        return sum(k for _, _, k in self._walk(host, hashes[start:], False))

    def lookup(self, host: int, hashes: list[int]) -> int:
        """The scheduler's lookup at admission (counted in the tiers' hit rates)."""
        return sum(k for _, _, k in self._walk(host, hashes, True))

    def load(self, host: int, hashes: Sequence[int]) -> tuple[int, dict[str, int]]:
        """Load the leading blocks the tiers still hold: (blocks, blocks per tier). Blocks from a slower
        tier are copied into the host tier, as the live store promotes them."""
        per_tier: dict[str, int] = {}
        runs = self._walk(host, hashes, False)
        for tier, first, k in runs:
            run = hashes[first:first + k]
            tier.touch(run)
            tier.stats.loaded += k
            per_tier[tier.name] = per_tier.get(tier.name, 0) + k
            if tier.name != "host" and self._host is not None:
                self._host[host].put(run)
        return sum(per_tier.values()), per_tier

    def missing(self, host: int, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks of ``hashes`` each tier would have to write (those it does not hold)."""
        return {tier.name: sum(1 for h in hashes if h not in tier) for tier in self.tiers(host)}

    def save(self, host: int, hashes: Sequence[int]) -> None:
        for tier in self.tiers(host):
            tier.put(hashes)

    def summary(self) -> dict:
        return {"tiers": {name: s.as_dict(self.block_bytes) for name, s in self.stats.items()},
                "block_bytes": self.block_bytes, "loaded_tokens": self.loaded_tokens,
                "dropped_saves": self.dropped_saves}


def make_store(spec, model, instances: Sequence) -> SimStore | None:
    """The cluster spec's store over its instances (None when the spec configures none): instances placed on
    hosts, blocks of the model's KV, each instance's links (host and remote: per card, times its cards)."""
    from pdserve.sim.perf_model import BYTES_PER_PARAM

    store_spec = spec.store
    if not store_spec.enabled or not instances:
        return None
    hw = instances[0].hardware
    cards = store_spec.cards_per_host or hw.num_cores or hw.node_size
    placement = Placement.fill(instances, cards)
    block_bytes = model.kv_bytes_per_token(BYTES_PER_PARAM[spec.kv_dtype]) * spec.block_size
    store = SimStore(store_spec, block_bytes, max(placement.hosts.values()) + 1)
    for inst in instances:
        gbs = tier_gbs(store_spec, inst.hardware)
        tp = inst.pool.tp
        inst.attach_store(store, placement.hosts[inst.instance_id],
                          {"host": gbs["host"] * tp, "disk": gbs["disk"], "remote": gbs["remote"] * tp})
    return store
