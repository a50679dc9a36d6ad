"""Rebuild a model's compiled forward from a cached trace: the backend's side of a warm start.

A cached trace (cached_trace.py) holds the split graph and, per piece, what the backend did
with it the first time: a splitting piece's graph (run eagerly), a compiled piece's artifact
key and sizes. `rebuild` loads every compiled piece's artifacts by that key through the
backend's usual path (this process's memory, the cache, the cluster) and never compiles: a
missing artifact raises TraceNeeded and the start traces with Dynamo after all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from kiln.workers.compilation import graph_codec
from kiln.workers.compilation.cached_trace import Replay, TraceNeeded
from kiln.workers.compilation.piece_runner import PieceRunner
from kiln.workers.compilation.piecewise_backend import SYMBOLIC, PiecewiseBackend, device_of, use_eager_impls


def _never() -> Any:
    raise AssertionError("a replayed trace never compiles")  # replaying() raises TraceNeeded first


def _device(replay: Replay, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device:
    """The device the graph computes on, as the backend would have seen it in Dynamo's inputs."""
    return device_of([*replay.constants, *args, *kwargs.values()])


def _compiled_runner(backend: PiecewiseBackend, item: dict[str, Any], sizes: list[int]) -> PieceRunner:
    piece = SimpleNamespace(index=item["index"])
    key = item["key"]
    if not key:
        raise TraceNeeded(f"piece {item['index']} has no artifact key in the cached trace")
    general = backend._get(piece, key, SYMBOLIC, _never)
    by_size: dict[int, Callable[..., Any]] = {}
    if item["size_arg"] is not None:
        missing = sorted(set(sizes) - set(item["sizes"]))
        if missing:
            raise TraceNeeded(f"compile sizes {missing} are not in the cached trace")
        for size in sizes:
            by_size[size] = backend._get(piece, f"{key}-s{size}", size, _never)
    return PieceRunner(item["index"], general, returns_single=item["returns_single"], is_splitting=False,
                       size_arg=item["size_arg"], by_size=by_size)


def rebuild(backend: PiecewiseBackend, replay: Replay, args: Sequence[Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    """The split module with every piece's runner in place, as the backend's __call__ returns it."""
    config, record = backend.config, backend.record
    with backend.replaying(replay.traced_files), backend.prefetching(replay.traced_files,
                                                                      _device(replay, args, kwargs)):
        record.config_hash = backend.config_hash
        pieces = replay.pieces
        compiled = [p for p in pieces if not p["splitting"]]
        record.pieces_total += len(pieces)
        record.pieces_splitting += len(pieces) - len(compiled)
        record.pieces_compiled += len(compiled)
        sizes = [s for s in (config.compile_sizes or []) if isinstance(s, int)]
        with_sizes = sum(p["size_arg"] is not None for p in compiled)
        backend._progress_total = (len(compiled) + with_sizes * len(sizes)) if config.use_inductor else 0
        backend._progress_done = 0
        runners: list[tuple[str, PieceRunner]] = []
        for item in sorted(pieces, key=lambda p: p["index"]):
            if item["splitting"] or not config.use_inductor:
                gm = graph_codec.decode(item["graph"])
                if item["splitting"]:
                    use_eager_impls(gm)
                runner = PieceRunner(item["index"], gm, returns_single=item["returns_single"],
                                     is_splitting=item["splitting"], size_arg=item["size_arg"])
            else:
                runner = _compiled_runner(backend, item, sizes)
            runners.append((item["name"], runner))
        names = {name for name, _ in runners}
        wanted = {n.target for n in replay.split_gm.graph.find_nodes(op="call_module")}
        if names != wanted:
            raise graph_codec.GraphCodecError(f"the cached pieces {sorted(names)} are not the split graph's "
                                              f"{sorted(wanted)}")
        backend.split_gm = replay.split_gm
        return backend.finish(replay.split_gm, runners)
