"""kiln's piecewise Dynamo backend (level 3): split, then compile or load every piece.

Called by Dynamo with the traced graph. Splits it at the splitting ops, walks the split graph
with fake tensors to learn each piece's inputs, and for every non-splitting piece gets one
artifact for the symbolic batch size plus one per `compile_sizes` entry: from this process's
memory if an identical piece was already done, else from the cache (compute-once across
processes: one compiles, the others wait and load), else by compiling with Inductor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from kiln.workers import torch_internals
from kiln.workers.compilation import graph_codec
from kiln.workers.compilation.artifacts import ArtifactError, compile_graph, load_graph, load_unpacked
from kiln.workers.compilation.cached_trace import TraceNeeded, traced_files
from kiln.workers.layers.custom_op import eager_impl
from kiln.workers.compilation.factors import cache_key_factors
from kiln.workers.compilation.mutation import mutated_inputs, protect_inputs
from kiln.workers.compilation.passes import PostGradPassManager
from kiln.workers.compilation.piece_runner import PieceRunner, size_index
from kiln.workers.compilation.prefetch import Prefetch
from kiln.workers.compilation.record import CompileRecord, Phase
from kiln.workers.compilation.split import Piece, split_graph
from kiln.workers.compilation.structural_hash import structural_hash
from kiln.workers.fanout import ClusterStep

if TYPE_CHECKING:
    from kiln.cache import CacheEntry, CacheStore
    from kiln.workers.config import CompilationConfig

log = logging.getLogger("kiln.compiler")

SYMBOLIC = "sym"


def _extract_root() -> str:
    """One private directory per process for loaded artifacts' files (kept until exit)."""
    global _EXTRACT_DIR
    if _EXTRACT_DIR is None:
        _EXTRACT_DIR = tempfile.TemporaryDirectory(prefix="kiln-loaded-")
    return _EXTRACT_DIR.name


_EXTRACT_DIR: tempfile.TemporaryDirectory | None = None


def device_of(example_inputs: Sequence[Any]) -> torch.device:
    """The device the graph computes on: a CUDA input's if there is one (a CPU-side tensor among
    the inputs must not key CUDA artifacts with CPU factors), else the first tensor's."""
    tensors = [v for v in example_inputs if isinstance(v, torch.Tensor)]
    cuda = [t for t in tensors if t.device.type == "cuda"]
    return (cuda or tensors)[0].device if tensors else torch.device("cpu")


def _concrete(value: Any, size: int | None) -> int:
    """Evaluate an int or SymInt with every batch symbol set to `size` (None: to the value it
    had in the trace, each symbol its own)."""
    if isinstance(value, torch.SymInt) and size is None:
        if value.node.hint is None:
            raise ValueError(f"{value} has no value from the trace")
        return int(value.node.hint)
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr.xreplace({sym: size for sym in expr.free_symbols}))
    return int(value)


def use_eager_impls(gm: fx.GraphModule) -> None:
    """Point a splitting piece's op calls at their registered eager implementations."""
    changed = False
    for node in gm.graph.nodes:
        impl = eager_impl(node.target) if node.op == "call_function" else None
        if impl is not None:
            node.target = impl
            changed = True
    if changed:
        gm.recompile()


def concrete_inputs(fake_args: Sequence[Any], size: int | None, real_by_id: dict[int, Any]) -> list[Any]:
    """Inputs for compiling a piece at a static batch size (None: at the sizes of the trace):
    real graph inputs where the piece takes them unchanged (weights), zero tensors of the
    concrete shape elsewhere."""
    out: list[Any] = []
    for value in fake_args:
        if isinstance(value, torch.SymInt):
            out.append(_concrete(value, size))  # 4*s0 is not s0
        elif isinstance(value, torch.Tensor):
            real = real_by_id.get(id(value))
            if real is not None and all(isinstance(s, int) for s in value.shape):
                out.append(real)
            else:
                shape = [_concrete(s, size) for s in value.shape]
                stride = [_concrete(s, size) for s in value.stride()]
                out.append(torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device).zero_())
        else:
            out.append(value)
    return out


def inductor_config_patches(config: CompilationConfig) -> dict[str, Any]:
    """Inductor config for compiling this config's graphs: `inductor_compile_config` (each option
    checked to exist) plus, when there are any, kiln's and the user's post-grad passes."""
    inductor_config = torch_internals.inductor_config()
    patches = dict(config.inductor_compile_config)
    for key in patches:
        obj = inductor_config
        for part in key.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"inductor_compile_config: unknown Inductor option {key!r}")
            obj = getattr(obj, part)
    passes = PostGradPassManager(config.resolved_passes, config.pass_config.enable_noop)
    if passes.noop is not None or passes.user_passes:
        patches["post_grad_custom_post_pass"] = passes
    return patches


def dump_graphs(directory: str, gm: fx.GraphModule, split_gm: fx.GraphModule, pieces: Sequence[Piece]) -> None:
    """config.debug_dump_path: the traced graph, the split graph and each piece's code, as
    readable Python (a debugging aid; a failure to write warns and compiling goes on)."""
    files = {"traced_graph.py": gm, "split_graph.py": split_gm}
    files.update({f"piece_{p.index:03d}{'_splitting' if p.is_splitting else ''}.py": p.module for p in pieces})
    try:
        os.makedirs(directory, exist_ok=True)
        for name, module in files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(module.print_readable(print_output=False))
    except OSError as exc:
        log.warning("debug_dump_path: cannot write graphs to %s: %s", directory, exc)


class PiecewiseBackend:
    """The level-3 Dynamo backend. One instance compiles one model on one rank."""

    tune_devices: tuple[str, ...] = ("cuda",)
    """Device types whose fresh artifacts run once before they are packed, so that what the
    runtime autotuner measured travels with them (Triton's, on CUDA; a CPU does not autotune)."""

    def __init__(
        self,
        config: CompilationConfig,
        store: CacheStore | None,
        *,
        rank: int = 0,
        record: CompileRecord | None = None,
    ):
        self.config = config
        self.store = store
        self.rank = rank
        self.record = record if record is not None else CompileRecord()
        self.config_hash = config.compute_hash()
        self.entry: CacheEntry | None = None
        self.runners: list[PieceRunner] = []
        self._done: dict[str, Callable[..., Any]] = {}  # graph key -> callable, this process
        self._index: dict[str, dict[str, Any]] = {}
        self._inductor_patches = inductor_config_patches(config)
        self._device = torch.device("cpu")
        self._prefetch: Prefetch | None = None
        self._replay_files: list[str] | None = None
        self._replay_loaded: dict[str, int] = {}  # graph key -> bytes, see replaying()
        self.split_gm: fx.GraphModule | None = None
        self.piece_records: list[dict[str, Any]] = []
        """Per piece, what a cached trace needs to rebuild it (see describe())."""
        self._not_describable = ""

    @contextlib.contextmanager
    def replaying(self, files: Sequence[str]) -> Iterator[None]:
        """For the block, the graph comes from the trace cache (traced `files` given, no Dynamo
        context to ask): every piece must load, and a miss raises TraceNeeded; any failure leaves
        the record's counters as they were (pieces loaded so far stay in this process's memory)."""
        saved, before = self.record.counters(), set(self._done)
        self._replay_files = list(files)
        try:
            yield
        except Exception:
            self.record.restore_counters(saved)
            # What it loaded stays loaded; the trace that follows counts it as the cache hit it was.
            nbytes = {v["graph_key"]: v["bytes"] or 0 for v in self._index.values()}
            self._replay_loaded.update({k: nbytes.get(k, 0) for k in set(self._done) - before})
            raise
        finally:
            self._replay_files = None

    # ---- Dynamo entry point -------------------------------------------------------------------

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        record = self.record
        record.config_hash = self.config_hash
        files = self._replay_files if self._replay_files is not None else traced_files(gm)
        with self.prefetching(files, device_of(example_inputs)):
            return self._compile_pieces(gm, example_inputs)

    @contextlib.contextmanager
    def prefetching(self, files: Sequence[str], device: torch.device) -> Iterator[None]:
        """Open the cache entry of a graph that traced `files` on `device` and, for the block,
        read, verify and unpack every artifact the rank's index lists, in parallel, while the
        graph is split and walked (or rebuilt from a cached trace); each piece takes its own."""
        record = self.record
        self._device = device
        self.entry = self.open_cache_entry(files, device)
        if self.entry is not None and self.config.use_inductor:
            self._prefetch = Prefetch(self.entry, self.rank, _extract_root())
        try:
            yield
        finally:
            if self._prefetch is not None:
                self._prefetch.close()
                if self._prefetch.blobs:
                    start, end = self._prefetch.start, self._prefetch.end or time.time()
                    record.phases.append(Phase("prefetch", "other", start, end, end - start,
                                               {"blobs": self._prefetch.blobs}))
                self._prefetch = None

    def _compile_pieces(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
        record = self.record
        with record.phase("split", "trace") as facts:
            split_gm, pieces = split_graph(gm, list(self.config.splitting_ops or []))
            facts["pieces"] = len(pieces)
        self.split_gm = split_gm
        if self.config.debug_dump_path:
            dump_graphs(os.path.join(self.config.debug_dump_path, f"rank_{self.rank}"), gm, split_gm, pieces)
        record.pieces_total += len(pieces)
        record.pieces_splitting += sum(p.is_splitting for p in pieces)
        record.pieces_compiled += sum(not p.is_splitting for p in pieces)
        n_sizes = sum(isinstance(s, int) for s in self.config.compile_sizes or [])
        # Upper bound, lowered in _runner_for for pieces that take no batch size (no static-size
        # artifacts); nothing is fetched without Inductor.
        compiled_pieces = sum(not p.is_splitting for p in pieces) if self.config.use_inductor else 0
        self._progress_total = compiled_pieces * (1 + n_sizes)
        self._progress_done = 0

        # Dynamo hands backends a fake mode of their own (sharing its shape env); fakify the
        # real inputs in it, which keeps their symbolic batch dimension.
        fake_mode = torch_internals.tracing_fake_mode()
        fake_args = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        real_by_id = {id(f): r for f, r in zip(fake_args, example_inputs) if isinstance(r, torch.Tensor)}

        by_name = {p.name: p for p in pieces}
        runners: dict[str, PieceRunner] = {}
        backend = self

        class _Walk(fx.Interpreter):
            # Propagate fake tensors through the split graph; build each piece's runner from
            # the inputs it actually receives.
            def call_module(self, target, args, kwargs):
                piece = by_name[target]
                out = super().call_module(target, args, kwargs)
                runners[target] = backend._runner_for(piece, args, real_by_id)
                return out[0] if piece.returns_single else out

        with fake_mode, torch_internals.python_dispatcher():
            _Walk(split_gm).run(*fake_args)

        return self.finish(split_gm, [(p.name, runners[p.name]) for p in pieces])

    def finish(self, split_gm: fx.GraphModule, runners: Sequence[tuple[str, PieceRunner]]) -> fx.GraphModule:
        """Put each piece's runner in the split module and publish what this rank loads."""
        record = self.record
        for name, runner in runners:
            # Shadow the submodule: the split module's generated code calls self.<name>(...).
            split_gm.__dict__[name] = runner
        self.runners = [runner for _, runner in runners]
        record.unique_pieces = len({k.split("-s")[0] for k in self._done})
        if self.entry is not None:
            # Only blobs that are on disk: a write that failed (disk full) must not leave the
            # index naming a blob nobody stored.
            stored = {name: v for name, v in self._index.items() if v["digest"] and self.entry.has_blob(v["digest"])}
            if stored:
                self.entry.rank_index(self.rank).update(stored)
        return split_gm

    # ---- pieces -------------------------------------------------------------------------------

    def _runner_for(self, piece: Piece, args: Sequence[Any], real_by_id: dict[int, Any]) -> PieceRunner:
        if piece.is_splitting:
            self._keep(piece, graph=True)
            use_eager_impls(piece.module)
            return PieceRunner(piece.index, piece.module, returns_single=piece.returns_single, is_splitting=True)
        if not self.config.use_inductor:
            # use_inductor=False: the pieces run as traced (still split, still capturable).
            self._keep(piece, graph=True, size_arg=size_index(args))
            return PieceRunner(piece.index, piece.module, returns_single=piece.returns_single,
                               is_splitting=False, size_arg=size_index(args))
        key = structural_hash(piece.module, args, self.config_hash)
        general = self._get(
            piece, key, SYMBOLIC,
            lambda: compile_graph(piece.module, args, dynamic_shapes="from_tracing_context",
                                  config_patches=self._inductor_patches,
                                  tuning_inputs=self._tuning_inputs(piece, args, real_by_id, None),
                                  notes=self.record.warnings),
        )
        sizes = [s for s in (self.config.compile_sizes or []) if isinstance(s, int)]
        by_size: dict[int, Callable[..., Any]] = {}
        if size_index(args) is None:
            self._progress_total -= len(sizes)
        else:
            for size in sizes:
                by_size[size] = self._get(
                    piece, f"{key}-s{size}", size,
                    lambda size=size: compile_graph(
                        piece.module, concrete_inputs(args, size, real_by_id),
                        dynamic_shapes="from_example_inputs", config_patches=self._inductor_patches,
                        tuning_inputs=self._tuning_inputs(piece, args, real_by_id, size),
                        notes=self.record.warnings),
                )
        self._keep(piece, key=key, size_arg=size_index(args), sizes=sorted(by_size))
        return PieceRunner(piece.index, general, returns_single=piece.returns_single, is_splitting=False,
                           size_arg=size_index(args), by_size=by_size)

    def _keep(self, piece: Piece, *, graph: bool = False, key: str | None = None, size_arg: int | None = None,
              sizes: Sequence[int] = ()) -> None:
        """Note what a cached trace needs to rebuild this piece: its artifacts' key, or, for a
        piece that runs as traced, its graph."""
        item: dict[str, Any] = {"index": piece.index, "name": piece.name, "splitting": piece.is_splitting,
                                "returns_single": piece.returns_single, "size_arg": size_arg,
                                "key": key, "sizes": list(sizes)}
        if graph:
            try:
                item["graph"] = graph_codec.encode(piece.module)
            except graph_codec.GraphCodecError as exc:
                self._not_describable = f"piece {piece.index}: {exc}"
        self.piece_records.append(item)

    def describe(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the split graph, the pieces) as a cached trace keeps them; ValueError if it can't."""
        if self._not_describable:
            raise ValueError(self._not_describable)
        assert self.split_gm is not None, "describe() before the backend ran"
        return graph_codec.encode(self.split_gm), sorted(self.piece_records, key=lambda p: p["index"])

    def _tuning_inputs(self, piece: Piece, args: Sequence[Any], real_by_id: dict[int, Any],
                       size: int | None) -> Callable[[], list[Any]] | None:
        """On CUDA, what compile_graph runs a fresh artifact on so that Triton's autotuner tunes
        it before it is packed: concrete inputs at `size` (the symbolic artifact: the trace's
        size), with a zero tensor in place of every real input the piece may write to (a KV
        cache must not see this run). None elsewhere: nothing autotunes at run time on a CPU."""
        if self._device.type not in self.tune_devices:
            return None
        mutated = self._mutated_inputs(piece)
        real = {id(v) for v in real_by_id.values()}

        def make() -> list[Any]:
            return protect_inputs(concrete_inputs(args, size, real_by_id), mutated, real)

        return make

    def _mutated_inputs(self, piece: Piece) -> list[int]:
        return mutated_inputs(piece.module)

    def _get(self, piece: Piece, graph_key: str, size: int | str,
             compile_fn: Callable[[], tuple[Callable[..., Any], bytes]]) -> Callable[..., Any]:
        record = self.record
        if graph_key in self._done:
            if graph_key in self._replay_loaded:  # loaded from the cache by an abandoned replay
                nbytes = self._replay_loaded.pop(graph_key)
                record.cache_hits += 1
                record.artifacts_loaded += 1
                record.bytes_loaded += nbytes
            else:
                record.memory_dedup_hits += 1
            self._note_index(piece, size, graph_key, None)
            fn = self._done[graph_key]
        else:
            fn = self._get_new(piece, graph_key, size, compile_fn)
            self._done[graph_key] = fn
        self._progress_done += 1
        if record.progress is not None:
            record.progress(f"piece {piece.index} size {size}", self._progress_done, self._progress_total)
        return fn

    def _get_new(self, piece: Piece, graph_key: str, size: int | str,
                 compile_fn: Callable[[], tuple[Callable[..., Any], bytes]]) -> Callable[..., Any]:
        record = self.record
        compiled: list[Callable[..., Any]] = []

        def compute() -> bytes:
            if self._replay_files is not None:
                raise TraceNeeded(f"piece {piece.index} size {size} is not in the cache")
            with record.phase(f"compile piece {piece.index} size {size}", "compile", graph_key=graph_key) as facts:
                fn, data = compile_fn()
                facts["bytes"] = len(data)
            record.inductor_compiles += 1
            compiled.append(fn)
            return data

        if self.entry is None:
            compute()
            fn = compiled[-1]
        else:
            fn = self._get_cached(piece, graph_key, size, compute, compiled)
        return fn

    def _get_cached(self, piece, graph_key, size, compute, compiled) -> Callable[..., Any]:
        record, entry = self.record, self.entry
        assert entry is not None
        for _ in range(2):
            written_before = entry.stats.blobs_written
            start = time.time()
            # A miss asks the cluster before compiling (workers/fanout.py); without fan-out, compute().
            cluster = ClusterStep(record.fanout, entry, graph_key, compute, record.warnings)
            preread = self._prefetch.bytes_of if self._prefetch is not None else None
            digest, data, computed = entry.get_or_compute(graph_key, cluster.compute, preread=preread)
            cluster.after(data, computed)
            if not computed and time.time() - start > 0.05:
                # Another process held this graph's lock: we waited for its compile.
                record.phases.append(Phase(f"wait piece {piece.index} size {size}", "wait", start, time.time(),
                                           time.time() - start, {"graph_key": graph_key}))
            self._note_index(piece, size, graph_key, digest, len(data))
            if computed and cluster.fetched is not None:
                record.cache_misses += 1
                record.phases.append(Phase(f"fetch piece {piece.index} size {size}", "fetch", start, time.time(),
                                           time.time() - start, {"graph_key": graph_key, "bytes": len(data),
                                                                 "node": cluster.fetched.node}))
            elif computed:
                record.cache_misses += 1
                if entry.stats.blobs_written > written_before:  # not on a read-only or full disk
                    record.artifacts_saved += 1
                    record.bytes_saved += len(data)
                return compiled[-1]
            else:
                record.cache_hits += 1
            try:
                with record.phase(f"load piece {piece.index} size {size}", "load", graph_key=graph_key,
                                  bytes=len(data)):
                    unpacked = self._prefetch.take_unpacked(digest, data) if self._prefetch is not None else None
                    fn = load_unpacked(unpacked) if unpacked else load_graph(data, _extract_root())
            except ArtifactError as exc:
                # Verified bytes that torch cannot load: drop them (unless another rank already
                # replaced them) and compile afresh.
                entry.invalidate(graph_key, str(exc), digest)
                cluster.unusable(digest, str(exc))
                record.warnings.append(f"artifact for piece {piece.index} size {size} unusable: {exc}")
                continue
            if cluster.fetched is None:  # fetched artifacts are counted by the fan-out report
                record.artifacts_loaded += 1
                record.bytes_loaded += len(data)
            return fn
        raise RuntimeError(f"piece {piece.index} size {size}: artifact unusable twice in a row")

    def _note_index(self, piece: Piece, size: int | str, graph_key: str, digest: str | None,
                    nbytes: int | None = None) -> None:
        if digest is None:
            digest = next((v["digest"] for v in self._index.values() if v["graph_key"] == graph_key), "")
        self._index[f"piece_{piece.index}/size_{size}"] = {
            "graph_key": graph_key, "digest": digest, "bytes": nbytes,
        }

    # ---- set-up -------------------------------------------------------------------------------

    def open_cache_entry(self, files: Sequence[str], device: torch.device) -> CacheEntry | None:
        factors, relative = cache_key_factors(self.config_hash, files, device)
        self.record.traced_files = sorted(set(self.record.traced_files) | set(relative))
        if self.store is None:
            return None
        entry = self.store.entry(factors)
        self.record.cache_key = entry.key
        self.record.cache_dir = str(entry.path)
        return entry
