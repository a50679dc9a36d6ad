"""The driver API: `Orchestrator` fans a hashed config out to one worker per rank.

    with Orchestrator("examples/toy_llama.py:build", tp_size=2, config=CompilationConfig()) as orch:
        report = orch.warmup([1, 2, 4, 8])
        logits = orch.run(input_ids, positions, seq_ids)

`address=None` starts a fresh embedded Ray cluster on 127.0.0.1 (or uses the one this process
already joined); "auto" or an address attaches to a running one. Workers on one node share the
cache root; ranks whose pieces are identical share one compile through the cache's compute-once
locks.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

from kiln.cache.permissions import resolve_root
from kiln.orchestrator.cluster import (
    STRATEGIES, alive_nodes, cluster_gpus, connect, placement_shortfall, rank_bundle, reserve, wants_gpus)
from kiln.orchestrator.fanout import Fanout, check_options, start_fanout
from kiln.orchestrator.progress import ProgressView
from kiln.orchestrator.report import RunReport
from kiln.workers.config import DEFAULT_CAPTURE_SIZES, CompilationConfig
from kiln.workers.models.spec import parse_model_spec
from kiln.workers.protocol import NodeInfo, SetupPayload, WorkerReport
from kiln.workers.runtime.generation import GenerateResult, GenerationLimits, check_request
from kiln.workers.worker import KilnWorker, WorkerFailure, local_factors

log = logging.getLogger("kiln.driver")



# How long, after a rank's failure, the driver waits for the others' before tearing them down.
FAILURE_GRACE_S = 2.0
DIED = "worker process died"
# Causes that follow from another rank's failure rather than explain it.
_KNOCK_ON = ("gloo", "nccl", "distbackenderror", "connection closed", "connection reset", "broken pipe",
             "timed out", "timeout")


def root_causes(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The failures that explain the others: processes that died first, then errors other than
    a peer's broken collective; knock-on failures only when nothing else is there."""
    died = [f for f in failures if str(f.get("cause", "")).startswith(DIED)]
    if died:
        return died
    own = [f for f in failures if not any(k in str(f.get("cause", "")).lower() for k in _KNOCK_ON)]
    return own or failures[:1]


class WarmupError(RuntimeError):
    """One or more ranks failed; `failures` lists rank, phase and cause of each. When it leaves
    warmup(), `report` is a RunReport of every attempt's failures (for --report/--trace)."""

    def __init__(self, failures: list[dict[str, Any]]):
        self.failures = failures
        self.report: RunReport | None = None
        lines = [f"rank {f['rank']} failed in phase {f['phase']!r}: {f['cause']}" for f in failures]
        super().__init__("; ".join(lines))


def driver_factors(device: str) -> dict[str, str]:
    return local_factors(device)


def _coerce_config(config: CompilationConfig | dict | str | None) -> CompilationConfig:
    if config is None:
        return CompilationConfig()
    if isinstance(config, CompilationConfig):
        return config
    if isinstance(config, dict):
        return CompilationConfig(**config)
    return CompilationConfig.from_json(config)


class Orchestrator:
    def __init__(
        self,
        model: str,
        tp_size: int = 1,
        config: CompilationConfig | dict | str | None = None,
        cache_root: str | None = None,
        address: str | None = None,
        *,
        model_kwargs: dict[str, Any] | None = None,
        placement: str = "PACK",
        device: str = "auto",
        cpus_per_rank: float = 1,
        num_cpus: int | None = None,
        max_retries: int = 0,
        progress: bool = True,
        timeout_s: float = 1800,
        placement_timeout_s: float = 120,
        runtime_env: dict[str, Any] | None = None,
        fanout: str = "auto",
        fanout_lifetime: str = "job",
        fanout_wait_s: float = 600,
    ):
        if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if placement not in STRATEGIES:
            raise ValueError(f"placement must be one of {', '.join(STRATEGIES)}, got {placement!r}")
        check_options(fanout, fanout_lifetime, fanout_wait_s)
        if runtime_env and address is None:
            # connect() only passes runtime_env when attaching; local workers already import from
            # this process's working directory.
            warnings.warn("runtime_env is ignored with address=None (the embedded local cluster); "
                          "pass address='auto' or host:port to ship it to a running cluster", stacklevel=2)
        parse_model_spec(model)
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.tp_size = tp_size
        self.config = _coerce_config(config)
        self.cache_root = cache_root if cache_root is not None else (self.config.cache_dir or None)
        self.address = address
        self.placement = placement
        self.device_request = device
        self.cpus_per_rank = cpus_per_rank
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.show_progress = progress
        self.timeout_s = timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.runtime_env = runtime_env
        # Cluster fan-out (orchestrator/fanout.py): "auto" when the ranks span nodes or a registry exists.
        self.fanout_mode, self.fanout_lifetime, self.fanout_wait_s = fanout, fanout_lifetime, fanout_wait_s
        self.fanout: Fanout | None = None
        self.workers: list[Any] = []
        self.pg: Any = None
        self.cluster: Any = None
        self.board: Any = None
        self.nodes: list[NodeInfo] = []
        self.orchestration: dict[str, float] = {}
        self.device = "cpu"
        self.started = False
        # The capture sizes the running workers were set up with (they keep them until restarted).
        self.started_sizes: list[int] | None = None
        self.generation_limits: GenerationLimits | None = None  # the model's, asked once

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        """Connect, reserve bundles, start workers and broadcast the config to them."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from kiln.workers.progress import ProgressBoard

        if self.cluster is None:
            self.cluster = connect(self.address, num_cpus=self.num_cpus, runtime_env=self.runtime_env)
            self.orchestration["cluster_start"] = self.cluster.seconds
        t0 = time.perf_counter()
        gpus = cluster_gpus()
        if self.device_request == "cuda" and gpus < 1:
            raise RuntimeError("device='cuda' but the Ray cluster has no GPUs")
        use_gpu = wants_gpus(self.device_request, gpus, self.tp_size)
        if self.device_request == "auto" and 0 < gpus < self.tp_size:
            log.warning("device auto: the cluster has %d GPU(s) for tp=%d; running every rank on CPU",
                        gpus, self.tp_size)
        self.device = "cuda" if use_gpu else "cpu"
        self._check_placement(use_gpu)
        self.pg = reserve(self.tp_size, use_gpu, self.cpus_per_rank, self.placement, self.placement_timeout_s)
        actor_cls = ray.remote(KilnWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=self.cpus_per_rank, num_gpus=1 if use_gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, self.tp_size)
            for r in range(self.tp_size)
        ]
        self.board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        # Asked together: the actors start in parallel, and the port comes with rank 0's answer.
        port_ref = self.workers[0].free_port.remote()
        *self.nodes, port = self._gather([*(w.node_info.remote() for w in self.workers), port_ref], "start")
        self.fanout = start_fanout(self.fanout_mode, self.fanout_lifetime, [n.node_id for n in self.nodes],
                                   self.fanout_wait_s)
        self.orchestration["actors_ready"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        payload = SetupPayload(
            config_json=self.config.to_json(indent=None),
            config_hash=self.config.compute_hash(),
            model=self.model, model_kwargs=self.model_kwargs,
            device=self.device, driver_factors=driver_factors(self.device),
            master_addr=self.nodes[0].node, master_port=port,
            cache_root=self.cache_root, progress=self.board, timeout_s=self.timeout_s,
            # A 'path/file.py:factory' spec is relative to the driver's directory; workers look
            # there after their own (which differs on another node or under a Ray job).
            search_dirs=[os.getcwd()],
            fanout=self.fanout.payload() if self.fanout is not None else None,
        )
        self._gather([w.setup.remote(payload) for w in self.workers], "setup")
        self.orchestration["broadcast"] = time.perf_counter() - t1
        # Building the model is per-rank work (its own phase in each rank's report), not
        # orchestration: the driver only waits for it.
        self._gather([w.build.remote() for w in self.workers], "build_model", timeout=self.timeout_s)
        self.started = True
        self.started_sizes = self._run_sizes()

    def _check_placement(self, use_gpu: bool) -> None:
        """Fail at once when the ranks can never be placed, rather than after placement_timeout_s."""
        problem = placement_shortfall(self.tp_size, rank_bundle(use_gpu, self.cpus_per_rank), self.placement,
                                      alive_nodes())
        if problem is None:
            return
        if self.address is None:
            # The embedded cluster (or one this process already joined), taken as fixed: no
            # autoscaler will add the missing nodes, so waiting could only end in a timeout.
            raise RuntimeError(f"{problem}; lower tp, give the cluster more CPUs (num_cpus, --num-cpus), "
                               "use device 'cpu' or choose another placement")
        log.warning("%s; waiting up to %.0f s for nodes to join", problem, self.placement_timeout_s)

    def _teardown_workers(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.fanout is not None:  # before the workers go: their objects go with them
            self.fanout.teardown([n.actor_id for n in self.nodes])
            self.fanout = None
        for actor in [*self.workers, *([self.board] if self.board is not None else [])]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers, self.board = [], None
        self.started_sizes = None
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        self.started = False

    def shutdown(self) -> None:
        """Stop the workers; stop the cluster too if kiln started it."""
        import ray

        if self.workers or self.pg is not None:
            try:
                self._gather([w.exit.remote() for w in self.workers], "shutdown", timeout=30)
            except Exception:
                pass
            self._teardown_workers()
        if self.cluster is not None and self.cluster.started_here and ray.is_initialized():
            ray.shutdown()
        self.cluster = None

    # ---- waiting on all ranks -----------------------------------------------------------------

    def _gather(self, refs: list[Any], phase: str, timeout: float | None = None,
                view: ProgressView | None = None) -> list[Any]:
        """Results of one call per rank, in rank order. The first failure kills every rank
        (peers would otherwise wait forever in a collective) and raises WarmupError."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            if view is not None and self.board is not None:
                try:
                    view.show(ray.get(self.board.snapshot.remote(), timeout=5))
                except Exception:
                    pass
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    failures = [self._describe_failure(rank, phase, exc)]
                    failures += self._other_failures([r for r in pending if r is not ref], index, phase)
                    self._teardown_workers()
                    raise WarmupError(root_causes(failures)) from None
            if deadline is not None and time.monotonic() > deadline:
                self._teardown_workers()
                raise WarmupError([{"rank": index[r], "phase": phase, "cause": f"no answer within {timeout} s"}
                                   for r in pending])
        return results

    def _other_failures(self, pending: list[Any], index: dict[Any, int], phase: str) -> list[dict[str, Any]]:
        """Failures of other ranks that arrive within FAILURE_GRACE_S of the first: a killed
        rank's peers fail in their collective at about the time its death is noticed, and the
        first to arrive need not be the cause."""
        import ray

        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S) if pending else ([], [])
        found = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                found.append(self._describe_failure(index[ref], phase, exc))
        return found

    def _describe_failure(self, rank: int, phase: str, exc: BaseException) -> dict[str, Any]:
        import ray

        cause = getattr(exc, "cause", None)
        if isinstance(cause, WorkerFailure):
            return {"rank": cause.rank, "phase": cause.phase, "cause": f"{cause.cause_type}: {cause.message}",
                    "traceback": cause.tb}
        if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
            last = None
            try:
                last = ray.get(self.board.snapshot.remote(), timeout=5).get(rank) if self.board else None
            except Exception:
                pass
            where = f"{phase} ({last['what']})" if last else phase
            return {"rank": rank, "phase": where,
                    "cause": f"{DIED} (killed, out of memory, or its node was lost)"}
        return {"rank": rank, "phase": phase, "cause": f"{type(exc).__name__}: {exc}"}

    # ---- the work -----------------------------------------------------------------------------

    def _run_sizes(self) -> list[int]:
        return list(self.config.cudagraph_capture_sizes or DEFAULT_CAPTURE_SIZES)

    def warmup(self, sizes: list[int] | None = None) -> RunReport:
        """Compile (or load) and capture on every rank; returns the merged run report."""
        if sizes is not None:
            # A list or tuple only: a str or dict would iterate into something else entirely.
            if not isinstance(sizes, (list, tuple)):
                raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}")
            bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
            if bad or not sizes:
                raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}")
            wanted = sorted(set(sizes))
            if self.started:
                # The running workers were set up with the first warm-up's config; new sizes
                # would change the config hash without reaching them.
                if wanted != self.started_sizes:
                    raise ValueError(
                        f"sizes {wanted} differ from this Orchestrator's first warm-up ({self.started_sizes}); "
                        "its workers keep the first config: make a new Orchestrator (or call shutdown() first)")
            else:
                self.config = self.config.model_copy(update={"cudagraph_capture_sizes": wanted})
        run_sizes = self._run_sizes()
        # Failures of attempts that a retry followed, tagged so the report does not call the run failed.
        retried: list[dict[str, Any]] = []
        started_at = time.time()
        t0 = time.perf_counter()
        for attempt in range(1, self.max_retries + 2):
            try:
                if not self.started:
                    self.start()
                view = ProgressView(self.tp_size, enabled=self.show_progress)
                reports = self._gather([w.warmup.remote(run_sizes) for w in self.workers], "warmup",
                                       timeout=self.timeout_s, view=view)
                view.close()
                break
            except WarmupError as exc:
                failures = [{**f, "attempt": attempt} for f in exc.failures]
                if attempt == self.max_retries + 1:
                    exc.report = self._merge([], run_sizes, t0, started_at, [*retried, *failures])
                    raise
                retried += [{**f, "retried": True} for f in failures]
                log.warning("warm-up attempt %d failed (%s); retrying with what the cache holds", attempt, exc)
        return self._merge(reports, run_sizes, t0, started_at, retried)

    def _merge(self, worker_reports: list[WorkerReport], sizes: list[int], t0: float, started_at: float,
               failures: list[dict[str, Any]]) -> RunReport:
        # The run report is a file format (plain JSON); the typed reports end here.
        reports = [r.model_dump(mode="json") for r in worker_reports]
        return RunReport.merge(
            reports, config_hash=self.config.compute_hash(), cache_root=self._report_cache_root(reports),
            model=self.model, tp_size=self.tp_size, sizes=sizes, wall_seconds=time.perf_counter() - t0,
            orchestration=dict(self.orchestration), started_at=started_at, failures=failures)

    def _report_cache_root(self, reports: list[dict[str, Any]]) -> str:
        """Where the cache really is: the ranks resolved the root themselves ({node}/{rank}
        expanded, $KILN_CACHE_ROOT read on their node), and each entry is <root>/<key>."""
        roots = sorted({os.path.dirname(os.path.normpath(r["cache_dir"])) for r in reports if r.get("cache_dir")})
        if roots:
            return ", ".join(roots)  # several with {node} or {rank} in the root
        # No rank opened an entry (a failure, or level 0): what the workers would have resolved.
        return str(resolve_root(self.cache_root))

    def _require_started(self, call: str) -> None:
        if not self.started:
            raise RuntimeError(f"{call} needs a warm-up first: call warmup()")

    def run(self, *inputs: Any, decode: bool | None = None) -> Any:
        """One forward on every rank; returns rank 0's output (a CPU tensor)."""
        self._require_started("run()")
        return self._gather([w.run.remote(list(inputs), decode) for w in self.workers], "run")[0]

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> GenerateResult:
        """Greedy decoding of token-id prompts on every rank, through the KV cache and the
        compiled (on GPUs, captured) model: all prompts prefilled as one batch, then one token
        per prompt per step. Returns rank 0's GenerateResult (new tokens per prompt, tokens/s).
        A request the model cannot take (more prompts than KV-cache slots, prompt + new tokens
        over max_seq_len, an empty prompt, a token id outside the vocabulary) is a ValueError
        raised before any rank runs; the model must say its limits (see GenerationLimits)."""
        check_request(prompts, max_new_tokens)
        self._require_started("generate()")
        if self.generation_limits is None:
            self.generation_limits = self._gather([self.workers[0].generation_limits.remote()], "generate")[0]
        check_request(prompts, max_new_tokens, self.generation_limits)
        prompts = [list(p) for p in prompts]
        results = self._gather([w.generate.remote(prompts, max_new_tokens) for w in self.workers], "generate")
        diverged = [r for r, result in enumerate(results) if result.tokens != results[0].tokens]
        if diverged:  # their KV caches now hold other tokens: later steps would be garbage
            raise RuntimeError(f"generate: ranks {diverged} chose other tokens than rank 0 (their logits "
                               "differ: the model's output must be the same full-vocab logits on every rank)")
        return results[0]

    def capture_status(self) -> list[dict[str, Any] | None]:
        """Per rank, lazy CUDA graph capture's progress now (sizes captured, failures, per size
        when; see KilnModel.capture_summary), None for ranks that captured eagerly. warmup()
        never waits for background captures; this asks, and waits for nothing either."""
        self._require_started("capture_status()")
        return self._gather([w.capture_status.remote() for w in self.workers], "capture_status")

    def reset_cache(self) -> None:
        """Zero every rank's KV cache (models that have one)."""
        self._require_started("reset_cache()")
        self._gather([w.reset_cache.remote() for w in self.workers], "reset_cache")

    def time_decode(self, batch: int, steps: int = 50) -> list[dict[str, float]]:
        """Per-rank median decode-step latency at `batch` (all ranks step together)."""
        self._require_started("time_decode()")
        return self._gather([w.time_decode.remote(batch, steps) for w in self.workers], "time_decode")
