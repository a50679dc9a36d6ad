"""The typed messages between the driver and its workers.

The driver sends a `SetupPayload` to every rank; a worker answers `node_info()` with a
`NodeInfo`, `setup()` with a `SetupResult` and `warmup()` with a `WorkerReport`. Both sides
construct and read these models, never dicts by key; the driver turns reports into plain JSON
only where they become the run report's file format (orchestrator/report.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PhaseKind = Literal["setup", "build", "trace", "compile", "load", "fetch", "wait", "capture", "run", "other"]
"""What a phase spent its time on: the columns of the per-rank table and the trace categories."""


class SetupPayload(BaseModel):
    """What the driver broadcasts: one payload for every rank (rank and world size go to the
    actor's constructor)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True,
                              use_attribute_docstrings=True)

    config_json: str
    """The CompilationConfig as JSON; the worker rebuilds it and checks `config_hash`."""
    config_hash: str
    """The driver's hash of that config (version skew between nodes shows as a mismatch)."""
    model: str
    """The model spec ('pkg.module:factory', 'path/file.py:factory' or a checkpoint directory)."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory."""
    device: Literal["cuda", "cpu"]
    """Where ranks run: one GPU each, or CPU bundles."""
    driver_factors: dict[str, str]
    """The driver's toolchain (torch, kiln, python, device type); a worker refuses on any difference."""
    master_addr: str
    """Rendezvous address of torch.distributed (rank 0's node)."""
    master_port: int
    """Rendezvous port (free on rank 0's node)."""
    cache_root: str | None = None
    """The cache root as given ({node}/{rank} expanded on the worker), None for the default."""
    progress: Any = None
    """Handle of the driver's progress board actor (None: no live progress)."""
    timeout_s: float = 1800
    """Timeout of torch.distributed collectives."""
    search_dirs: list[str] = []
    """Where a 'path/file.py:factory' spec is looked for after the worker's own directory."""
    fanout: dict[str, Any] | None = None
    """Cluster fan-out: the registry actor's handle and its settings (None: off; workers/fanout.py)."""


class NodeInfo(BaseModel):
    """Where a rank landed, asked before setup."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int
    node: str
    node_id: str
    actor_id: str
    """Ray's id of the worker actor (the registry watches the actors that claim graphs)."""
    pid: int
    hostname: str
    cuda_visible_devices: str | None
    gpu_ids: list[str]
    cuda_available: bool
    visible_gpus: int


class SetupResult(BaseModel):
    """A worker's answer to setup(): the device it runs on and the collective backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    dist_backend: str


class PhaseRecord(BaseModel):
    """One timed phase of a rank's warm-up."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """e.g. "dynamo_trace", "compile piece 2 size sym", "load piece 2 size 8", "capture"."""
    kind: PhaseKind
    """What the time went to (the report adds seconds up by kind, never by parsing names)."""
    start: float
    """Wall-clock seconds since the epoch (comparable across processes of one node)."""
    end: float
    seconds: float
    extra: dict[str, Any] = {}
    """Phase-specific facts: bytes, graph key, GiB captured, …"""


class WorkerReport(BaseModel):
    """Everything one rank reports about its warm-up."""

    model_config = ConfigDict(extra="forbid")

    rank: int
    world_size: int
    node: str
    node_id: str
    pid: int
    device: str
    cuda_visible_devices: str | None
    dist_backend: str
    config_hash: str
    cache_key: str = ""
    cache_dir: str = ""
    phases: list[PhaseRecord] = []
    inductor_compiles: int = 0
    """Graphs this rank compiled with Inductor (per piece and size)."""
    cache_hits: int = 0
    cache_misses: int = 0
    artifacts_saved: int = 0
    artifacts_loaded: int = 0
    bytes_saved: int = 0
    bytes_loaded: int = 0
    memory_dedup_hits: int = 0
    """(piece, size) served by an identical piece already compiled or loaded in this process."""
    autotune_benchmarks: int = 0
    """Times Inductor benchmarked autotuning candidates during the warm-up (0 on a warm start)."""
    pieces_total: int = 0
    pieces_splitting: int = 0
    pieces_compiled: int = 0
    unique_pieces: int = 0
    traced_files: list[str] = []
    trace_cache: str = ""
    """Whether Dynamo ran: "skipped (cached)", or "ran (why the cached trace did not serve)"."""
    warnings: list[str] = []
    cudagraphs: str = "off"
    capture: dict[str, Any] | None = None
    """The capture phase's facts (sizes, graphs, GiB, mode), None without CUDA graphs."""
    capture_stats: list[dict[str, Any]] = []
    lazy_capture: dict[str, Any] | None = None
    """With cudagraph_capture="lazy": KilnModel.capture_summary() when the report was made (the
    rank reports ready before its captures end): sizes, how many captured so far, failures, and
    per size its state, seconds and seconds after ready. None with eager capture."""
    custom_ops: dict[str, dict[str, int]] = Field(default_factory=lambda: {"enabled": {}, "disabled": {}})
    """Custom-op layers built on each path: {"enabled": {name: n}, "disabled": {name: n}}."""
    wall_seconds: float = 0.0
    fanout: dict[str, Any] | None = None
    """Cluster fan-out counts (fetched, bytes, seconds, sources, fallbacks), None when off."""
    error: dict[str, Any] | None = None
