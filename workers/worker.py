"""The per-rank worker: one Ray actor per GPU (or CPU bundle).

The driver sends a `SetupPayload` (config JSON, config hash, model spec, rendezvous address,
its own toolchain factors; see protocol.py). `setup()` recomputes the hash and compares the
factors, refusing to run on any difference, and joins torch.distributed (NCCL on GPU, gloo on
CPU); `build()` builds the model shard (its own phase: weights can dwarf compiling);
`warmup()` compiles (or loads) and captures, and returns a `WorkerReport` (with lazy capture it
returns once the pieces are loaded, while a background thread captures: `capture_status()`). Any exception leaves
as one `WorkerFailure` naming the rank, the phase it happened in, and the cause.

The class is plain Python; the driver wraps it with `ray.remote`.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
import traceback
from typing import Any

import torch

from kiln.workers.compilation.factors import kiln_version
from kiln.workers.protocol import NodeInfo, PhaseRecord, SetupPayload, SetupResult, WorkerReport
from kiln.workers.torch_internals import tree_map


class WorkerFailure(RuntimeError):
    """A rank failed: which rank, in which phase, and why (picklable across Ray)."""

    def __init__(self, rank: int, phase: str, cause_type: str, message: str, tb: str = ""):
        super().__init__(f"rank {rank} failed in phase {phase!r}: {cause_type}: {message}")
        self.rank, self.phase, self.cause_type, self.message, self.tb = rank, phase, cause_type, message, tb

    def __reduce__(self):
        return (WorkerFailure, (self.rank, self.phase, self.cause_type, self.message, self.tb))

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "phase": self.phase, "type": self.cause_type,
                "message": self.message, "traceback": self.tb}


class SkewError(RuntimeError):
    """The worker's toolchain or config differs from the driver's."""


def local_factors(device_type: str) -> dict[str, str]:
    """What must agree between driver and workers before any compile is shared."""
    return {
        "torch": torch.__version__,
        "kiln": kiln_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "device": device_type,
    }


def _start_profile() -> Any:
    """A running profile of the worker's thread when KILN_PROFILE_DIR is set (see
    KilnWorker._write_profile)."""
    if not os.environ.get("KILN_PROFILE_DIR"):
        return None
    from kiln.workers import profiling

    try:
        return profiling.start()
    except ValueError as exc:  # Python 3.12+: another profiler holds the thread
        print(f"kiln: KILN_PROFILE_DIR is set but this worker cannot be profiled: {exc}", file=sys.stderr)
        return None


class KilnWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.phase = "start"
        self.kiln: Any = None
        self.model: Any = None
        self.report: WorkerReport | None = None
        self.started = time.time()
        self.profile = _start_profile()

    # ---- small queries the driver makes before set-up ----------------------------------------

    def node_info(self) -> NodeInfo:
        import ray

        ctx = ray.get_runtime_context()
        return NodeInfo(
            rank=self.rank,
            node=ray.util.get_node_ip_address(),
            node_id=ctx.get_node_id()[:12],
            actor_id=ctx.get_actor_id(),
            pid=os.getpid(),
            hostname=platform.node(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
            cuda_available=torch.cuda.is_available(),
            visible_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    # ---- the warm-up ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> WorkerFailure:
        if isinstance(exc, WorkerFailure):
            return exc
        return WorkerFailure(self.rank, self.phase, type(exc).__name__, str(exc), traceback.format_exc())

    def setup(self, payload: SetupPayload) -> SetupResult:
        """Check skew and join the process group."""
        try:
            return self._setup(payload)
        except BaseException as exc:  # noqa: BLE001 - everything leaves as a WorkerFailure
            raise self._fail(exc) from None

    def build(self) -> None:
        """Build this rank's model shard and open its cache root."""
        try:
            self._build()
        except BaseException as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def _setup(self, p: SetupPayload) -> SetupResult:
        from kiln.workers.compilation.record import CompileRecord
        from kiln.workers.config import CompilationConfig
        from kiln.workers.layers.parallel_state import set_tp_state

        self.phase = "verify"
        use_cuda = p.device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise SkewError("device differs: the driver placed this rank on a GPU, but torch here sees no CUDA")
        mine = local_factors("cuda" if use_cuda else "cpu")
        for name, theirs in p.driver_factors.items():
            if mine.get(name) != theirs:
                raise SkewError(f"{name} differs: driver has {theirs!r}, this worker has {mine.get(name)!r}; "
                                "refusing to compile (artifacts would not be interchangeable)")
        config = CompilationConfig.from_json(p.config_json)
        if config.compute_hash() != p.config_hash:
            raise SkewError(f"config differs: driver hash {p.config_hash}, worker hash "
                            f"{config.compute_hash()} for the same JSON (kiln version skew between nodes?)")
        self.config, self.payload = config, p

        self.record = CompileRecord()
        with self.record.phase("init_process_group", "setup") as facts:
            self.phase = "init_process_group"
            device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(device)
            backend = "nccl" if use_cuda else "gloo"
            if self.world_size > 1:
                import torch.distributed as dist

                dist.init_process_group(
                    backend, init_method=f"tcp://{p.master_addr}:{p.master_port}",
                    rank=self.rank, world_size=self.world_size,
                    timeout=datetime.timedelta(seconds=p.timeout_s),
                    **({"device_id": device} if use_cuda else {}))
            set_tp_state(self.world_size, self.rank)
            facts["backend"] = backend
        self.dist_backend = backend
        self.device = device
        self.phase = "ready"
        return SetupResult(device=self._device_name(), dist_backend=backend)

    def _build(self) -> None:
        import ray

        from kiln.cache import CacheStore
        from kiln.cache.permissions import resolve_root
        from kiln.workers.compilation.record import Phase
        from kiln.workers.layers.custom_op import building_with
        from kiln.workers.models.spec import build_model

        p = self.payload
        with self.record.phase("build_model", "build"):
            self.phase = "build_model"
            with building_with(self.config) as counts:
                self.model = build_model(p.model, p.model_kwargs, tuple(p.search_dirs))
        self.custom_op_counts = counts
        loaded = getattr(self.model, "loaded_bytes", None)
        if loaded:  # a checkpoint model: reading its slices is a phase of its own, the build's tail
            build = self.record.phases[-1]
            seconds = min(float(getattr(self.model, "load_seconds", 0.0)), build.seconds)
            build.end, build.seconds = build.end - seconds, build.seconds - seconds
            self.record.phases.append(Phase("load_weights", "build", build.end, build.end + seconds, seconds,
                                            {"bytes": loaded, "gb_per_s": loaded / 1e9 / max(seconds, 1e-9)}))

        self.phase = "open_cache"
        node = ray.get_runtime_context().get_node_id()[:12]
        self.store = CacheStore(resolve_root(p.cache_root, node=node, rank=self.rank))
        self.progress = p.progress
        # Cluster fan-out: the registry's handle, when the driver turned it on (workers/fanout.py).
        from kiln.workers.fanout import make_client

        self.record.fanout = make_client(p.fanout)
        self.phase = "ready"

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{self.device.index} {torch.cuda.get_device_name(self.device)}"
        return "cpu"

    def warmup(self, sizes: list[int]) -> WorkerReport:
        try:
            return self._warmup(sizes)
        except BaseException as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def _warmup(self, sizes: list[int]) -> WorkerReport:
        from kiln.workers.runtime.kiln_model import KilnModel

        record, config = self.record, self.config
        if self.progress is not None:
            board, rank = self.progress, self.rank

            def post(what: str, done: int, total: int) -> None:
                self.phase = f"compile {what}"
                board.update.remote(rank, what, done, total)

            record.progress = post
        self.phase = "compile"
        self.kiln = KilnModel(self.model, config, store=self.store, rank=self.rank, record=record)
        self.kiln.compile(sizes)
        if hasattr(self.model, "reset_cache"):
            self.model.reset_cache()
        self.phase = "report"
        self.report = self._report()
        self.phase = "ready"
        if self.profile is not None:
            self._write_profile()
        return self.report

    def _write_profile(self) -> None:
        """KILN_PROFILE_DIR: this rank's cProfile from the actor's start to ready, as
        rank{N}.prof (pstats) and rank{N}.txt (the top functions)."""
        from kiln.workers import profiling

        profiling.write(self.profile, os.path.join(os.environ["KILN_PROFILE_DIR"], f"rank{self.rank}"))
        self.profile = None

    def _report(self) -> WorkerReport:
        import ray

        rec = self.record
        capture = next((p for p in rec.phases if p.kind == "capture"), None)
        counters = {name: getattr(rec, name) for name in (
            "inductor_compiles", "cache_hits", "cache_misses", "artifacts_saved", "artifacts_loaded",
            "bytes_saved", "bytes_loaded", "memory_dedup_hits", "autotune_benchmarks", "pieces_total",
            "pieces_splitting", "pieces_compiled", "unique_pieces", "cache_key", "cache_dir", "trace_cache")}
        return WorkerReport(
            **counters,
            phases=[PhaseRecord(**vars(p)) for p in rec.phases],
            traced_files=list(rec.traced_files), warnings=list(rec.warnings),
            rank=self.rank, world_size=self.world_size,
            node=ray.util.get_node_ip_address(),
            node_id=ray.get_runtime_context().get_node_id()[:12],
            pid=os.getpid(), device=self._device_name(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            dist_backend=self.dist_backend,
            config_hash=self.config.compute_hash(),
            cudagraphs=self.kiln.cudagraph_status if self.kiln else "off",
            capture=capture.extra if capture else None,
            capture_stats=[dict(vars(s)) for s in list(self.kiln.pool.stats if self.kiln and self.kiln.pool else [])],
            lazy_capture=self.kiln.capture_summary() if self.kiln is not None and self.kiln.lazy else None,
            custom_ops=self.custom_op_counts.as_dict(),
            wall_seconds=time.time() - self.started,
            fanout=self.record.fanout.report() if self.record.fanout is not None else None,
        )

    # ---- forward on all ranks ---------------------------------------------------------------

    def run(self, inputs: list[Any], decode: bool | None = None) -> Any:
        try:
            self.phase = "run"
            if self.kiln is None:
                raise RuntimeError("run() before warmup(): nothing is compiled yet")
            args = [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in inputs]
            with torch.no_grad():
                out = self.kiln(*self.kiln.place(*args), decode=decode)
            self.phase = "ready"
            if self.rank != 0:
                return None
            return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)
        except BaseException as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def reset_cache(self) -> None:
        if hasattr(self.model, "reset_cache"):
            self.model.reset_cache()

    # ---- greedy generation on all ranks -------------------------------------------------------

    def generation_limits(self) -> Any:
        """The model's GenerationLimits (max_seqs, max_seq_len, vocab_size), for the driver's checks."""
        from kiln.workers.runtime.generation import limits_of

        try:
            return limits_of(self.model)
        except BaseException as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Any:
        """Greedy tokens for `prompts` through the KV cache and the compiled (captured) model;
        every rank computes the same tokens from the same full-vocab logits (a GenerateResult)."""
        from kiln.workers.runtime.generation import check_request, greedy_generate, limits_of

        try:
            self.phase = "generate"
            if self.kiln is None:
                raise RuntimeError("generate() before warmup(): nothing is compiled yet")
            check_request(prompts, max_new_tokens, limits_of(self.model))
            self.model.reset_cache()
            kiln = self.kiln

            def step(ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, decode: bool) -> Any:
                return kiln(*kiln.place(ids, positions, seq_ids), decode=decode)

            result = greedy_generate(step, prompts, max_new_tokens, self.device)
            self.phase = "ready"
            return result
        except BaseException as exc:  # noqa: BLE001
            raise self._fail(exc) from None

    def time_decode(self, batch: int, steps: int = 50, warmup: int = 10) -> dict[str, float]:
        """Median latency of a decode step of `batch` sequences on this rank (CUDA events)."""
        import statistics

        inputs = self.kiln.place(*self.model.example_inputs(batch))
        times = []
        with torch.no_grad():
            for i in range(warmup + steps):
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    self.kiln(*inputs, decode=True)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    self.kiln(*inputs, decode=True)
                    ms = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    times.append(ms)
        return {"batch": batch, "median_ms": statistics.median(times), "min_ms": min(times)}

    def collective_calls(self, batch: int) -> int:
        """Host-side all-reduce launches during one decode step (0 when they run inside a
        replayed CUDA graph): how one checks that the collectives were captured."""
        inputs = self.kiln.place(*self.model.example_inputs(batch))
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.kiln(*inputs, decode=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if "allreduce" in e.key.lower().replace("_", ""))

    def capture_status(self) -> dict[str, Any] | None:
        """Lazy capture's progress now (KilnModel.capture_summary()); None with eager capture.
        The warm-up report is a snapshot at ready; this is how a driver sees the rest."""
        return self.kiln.capture_summary() if self.kiln is not None and self.kiln.lazy else None

    def exit(self) -> None:
        import torch.distributed as dist

        if self.kiln is not None:  # stop a lazy capture thread between two sizes
            self.kiln.close(timeout=10.0)

        if dist.is_initialized():
            dist.destroy_process_group()
