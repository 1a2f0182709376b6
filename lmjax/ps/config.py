"""The parameter-server run configuration and its checks (before any process starts)."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PSConfig:
    """One parameter-server run (gin: `ps.num_workers = 4`). `num_workers` counts every
    worker, backups included."""

    model: Any = None  # a model config, e.g. GPTConfig() or CBoWConfig() (lmjax.models.MODELS)
    task: str = "lm"  # what the workers train: lm or classify (lmjax/train/registry.py)
    transport: str = "inproc"  # or "jax_distributed"
    num_servers: int = 1
    num_workers: int = 2
    policy: str = "bsp"  # bsp, backup, async, ssp, softsync (lmjax/ps/policies.py)
    backup_workers: int = 0  # backup: apply the first num_workers - backup_workers gradients
    staleness_bound: int = 0  # ssp: s; -1 means unbounded
    softsync_n: int = 1  # softsync: apply after num_workers / n gradients
    n_fetch: int = 1  # async (Downpour): pull every n_fetch steps
    n_push: int = 1  # async (Downpour): push the mean of n_push steps' gradients
    # A worker pushes at most this many gradients computed from one version of a shard's
    # parameters, then waits for a newer version instead of computing more from the old one.
    max_pushes_per_version: int = 4
    # Push compression (lmjax/ps/codecs.py): none, bf16, topk, randk, sign, qsgd.
    compression: str = "none"
    compression_fraction: float = 0.01  # topk, randk: fraction of each gradient's entries
    qsgd_levels: int = 127  # qsgd: s, levels per sign (127 fits int8, up to 32767 int16)
    error_feedback: bool = False  # add what compression dropped to the next push
    # Pull caching and filtering (lmjax/ps/pull.py). A worker keeps its last copy of every
    # shard and pulls a shard again only once its version moved by pull_every_versions
    # (async and ssp; 1: whenever it moved at all).
    pull_every_versions: int = 1
    # > 0: a pull sends only the entries that moved by more than this since the worker's
    # copy, the significantly-modified filter of Li et al. 2014 (inproc transport).
    pull_filter_threshold: float = 0.0
    # Embedding tables move as rows: a push carries the rows its batches touched, a pull
    # the rows of the worker's next batch (lmjax/ps/sparse.py; inproc transport).
    sparse_keys: bool = False
    num_updates: int = 60
    batch_size: int = 8  # per worker and step
    optimizer: str = "adam"  # sgd, momentum, adam, adagrad (lmjax/ps/server.py)
    learning_rate: float = 1e-3  # alpha0
    lr_scaling: str = "fixed"  # or "staleness": alpha0 / max(1, mean staleness)
    seed: int = 0
    # Virtual-time compute model of the inproc transport (lmjax/ps/inproc.py).
    delay: str = "fixed"  # or "lognormal"
    compute_time: float = 1.0  # seconds of virtual time per gradient at slow-down 1
    slowdown: tuple[float, ...] = ()  # per-worker factors; missing workers get 1
    sigma: float = 0.0  # lognormal: sigma of log(time)
    # Real processes (jax_distributed).
    port: int = 0  # coordinator port on 127.0.0.1; 0 picks a free one
    checkpoint_every: int = 20  # server shards save an orbax checkpoint every K updates
    max_restarts: int = 0  # how often the supervisor restarts a dead server or worker
    faults: tuple[str, ...] = ()  # "worker1@20": SIGKILL worker 1 once update 20 is applied
    heartbeat_timeout: int = 10  # seconds before the coordination service drops a process
    join_timeout: int = 180  # seconds for every process to start and join

    @property
    def num_active(self) -> int:
        """Gradients per synchronous round (backup: the first N of N + b)."""
        return self.num_workers - self.backup_workers


POLICIES_WITH_DOWNPOUR = ("async",)


def validate(config: PSConfig, num_leaves: int, known: dict[str, list[str]]) -> None:
    """Raises ValueError naming the contradiction and the fix; `known` lists registry names."""
    for field, names in known.items():
        if getattr(config, field) not in names:
            raise ValueError(f"unknown ps.{field} {getattr(config, field)!r}; known: "
                             f"{', '.join(names)}")
    positive = ("num_servers", "num_workers", "softsync_n", "n_fetch", "n_push", "num_updates",
                "batch_size", "checkpoint_every", "heartbeat_timeout", "join_timeout",
                "max_pushes_per_version", "pull_every_versions")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"ps.{name} must be positive, got {getattr(config, name)}")
    if config.num_servers > num_leaves:
        raise ValueError(f"ps.num_servers={config.num_servers} exceeds the model's {num_leaves} "
                         "parameter arrays; every shard needs at least one: use fewer servers")
    if config.staleness_bound < -1:
        raise ValueError(f"ps.staleness_bound must be >= 0 (or -1 for unbounded), got "
                         f"{config.staleness_bound}")
    if config.policy == "softsync" and config.num_workers % config.softsync_n:
        raise ValueError(f"ps.softsync_n={config.softsync_n} does not divide "
                         f"ps.num_workers={config.num_workers} (lambda); pick a divisor")
    if config.softsync_n > config.num_workers:
        raise ValueError(f"ps.softsync_n={config.softsync_n} exceeds ps.num_workers")
    if not 0 <= config.backup_workers < config.num_workers:
        raise ValueError(f"ps.backup_workers={config.backup_workers} must be in "
                         f"[0, num_workers={config.num_workers})")
    if config.policy not in POLICIES_WITH_DOWNPOUR and (config.n_fetch, config.n_push) != (1, 1):
        raise ValueError("ps.n_fetch and ps.n_push apply to the 'async' policy only")
    per_fetch = -(-config.n_fetch // config.n_push)  # pushes between two pulls
    if config.max_pushes_per_version < per_fetch:
        raise ValueError(f"ps.max_pushes_per_version={config.max_pushes_per_version} is below "
                         f"the {per_fetch} pushes a worker makes between two pulls (n_fetch / "
                         "n_push); raise it")
    _validate_compression(config)
    _validate_pulls(config)
    if len(config.slowdown) > config.num_workers or any(f <= 0 for f in config.slowdown):
        raise ValueError(f"ps.slowdown {config.slowdown} needs at most num_workers positive "
                         "factors")
    if not 0 <= config.port < 65536:
        raise ValueError(f"ps.port {config.port} is not a TCP port")
    for fault in config.faults:
        parse_fault(fault, config)


def _validate_compression(config: PSConfig) -> None:
    if not 0 < config.compression_fraction <= 1:
        raise ValueError(f"ps.compression_fraction must be in (0, 1], got "
                         f"{config.compression_fraction}")
    if not 1 <= config.qsgd_levels <= 32767:
        raise ValueError(f"ps.qsgd_levels must be in [1, 32767] (levels per sign, sent as "
                         f"int8 up to 127, else int16), got {config.qsgd_levels}")
    if config.error_feedback and config.compression == "none":
        raise ValueError("ps.error_feedback=True does nothing with ps.compression='none' "
                         "(nothing is dropped); pick a codec or turn error feedback off")


POLICIES_THAT_SKIP_VERSIONS = ("async", "ssp")


def _validate_pulls(config: PSConfig) -> None:
    if not 0 <= config.pull_filter_threshold < float("inf"):
        raise ValueError(f"ps.pull_filter_threshold must be a finite number >= 0 (0: pull "
                         f"every changed shard whole), got {config.pull_filter_threshold}")
    if config.pull_every_versions > 1 and config.policy not in POLICIES_THAT_SKIP_VERSIONS:
        raise ValueError(f"ps.pull_every_versions={config.pull_every_versions} needs an "
                         f"asynchronous policy ({', '.join(POLICIES_THAT_SKIP_VERSIONS)}): "
                         f"under {config.policy!r} a gradient of an old version is dropped")
    inproc_only = {"pull_filter_threshold": config.pull_filter_threshold > 0,
                   "sparse_keys": config.sparse_keys}
    for name, used in inproc_only.items():
        if used and config.transport != "inproc":
            raise ValueError(f"ps.{name} runs on the inproc transport only: the key-value "
                             "store has no per-worker replies to carry a filtered pull or "
                             "rows; use ps.transport='inproc'")
    if config.sparse_keys and (config.n_fetch, config.pull_every_versions) != (1, 1):
        raise ValueError("ps.sparse_keys pulls the rows of each next batch before it is "
                         "computed: it needs ps.n_fetch=1 and ps.pull_every_versions=1")


def parse_fault(fault: str, config: PSConfig) -> tuple[str, int, int]:
    """'worker1@20' -> ('worker', 1, 20)."""
    role, _, at = fault.partition("@")
    kind = role.rstrip("0123456789")
    count = {"worker": config.num_workers, "server": config.num_servers}.get(kind)
    index = role[len(kind):]
    if count is None or not index.isdigit() or int(index) >= count or not at.isdigit():
        raise ValueError(f"bad ps.faults entry {fault!r}: write ROLE@UPDATE such as 'worker1@20' "
                         f"(workers 0..{config.num_workers - 1}, servers "
                         f"0..{config.num_servers - 1})")
    return kind, int(index), int(at)
