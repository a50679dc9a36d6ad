"""A warm start without Dynamo: the first trace's graph and bindings, kept in the cache.

The first start traces the forward with Dynamo (trace_once.py). What that produced is stored
as one record in a cache entry of its own, keyed by `trace_key.trace_factors` (the model's
attributes, weights' shapes and dtypes, the call's inputs, the config, torch, grad mode, …):

    split_graph    the backend's split graph: the graph Dynamo traced, cut at the splitting ops,
                   calling one submodule per piece (graph_codec: plain JSON, no pickle)
    pieces         per piece: splitting or compiled, its structural hash (the graph key of its
                   artifacts) and sizes, and, for pieces that run as traced, their graph
    placeholders   per graph input: which forward argument (or its size) or which parameter /
                   buffer, by name, binds to it
    out_spec       how the forward's return value is rebuilt from the graph's outputs
    traced_files   the source files Dynamo inlined, relative to sys.path, and their hash

A later start with the same key reads the record, checks the traced files still hash the same,
rebuilds the split graph and has the backend load each piece's artifacts by its recorded key:
no Dynamo, no split, no hashing. Any doubt is a miss, with the reason in the report: no record,
another key, a traced file edited, a record that does not decode (it is dropped), or an
artifact not in the cache, say for a compile size added since (then Dynamo traces after all
and only what is missing compiles).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from kiln.workers import torch_internals
from kiln.workers.compilation import graph_codec
from kiln.workers.compilation.factors import code_hash, relative_source_path
from kiln.workers.compilation.trace_key import UnkeyableModel, trace_factors

if TYPE_CHECKING:
    from kiln.cache import CacheEntry, CacheStore

log = logging.getLogger("kiln.cached_trace")

GRAPH_KEY = "dynamo_trace"
RECORD_FORMAT = 1


def traced_files(gm: fx.GraphModule) -> list[str]:
    """Source files the trace in progress inlined: Dynamo's list where this torch keeps one,
    else the files named in the graph's stack traces."""
    files = torch_internals.traced_code_files()
    if not files:
        for node in gm.graph.nodes:
            for line in (node.meta.get("stack_trace") or "").splitlines():
                line = line.strip()
                if line.startswith('File "'):
                    files.add(line[len('File "'):].split('"', 1)[0])
    return sorted(files)


class TraceNeeded(RuntimeError):
    """Raised by a backend replaying a cached trace when something is not in the cache."""


@dataclass(frozen=True)
class Binding:
    """How one graph input is bound (trace_once's plan, by name instead of by object)."""

    kind: str  # "input" | "size" | "const"
    pos: int | None = None
    name: str | None = None
    dim: int = 0
    tensor: str | None = None  # "const": the parameter's or buffer's name in the module


@dataclass
class Replay:
    """A cached trace rebuilt: the split graph, for the backend to fill with its pieces."""

    split_gm: fx.GraphModule
    pieces: list[dict[str, Any]]
    bindings: list[Binding]
    constants: list[torch.Tensor | None]
    out_spec: Any
    traced_files: list[str]


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _resolve_source(rel: str, hint: str | None) -> str | None:
    """The file a relative traced-source path names in this process (sys.path order)."""
    if hint and os.path.isfile(hint) and relative_source_path(hint) == rel:
        return hint
    for entry in sys.path:
        path = os.path.join(os.path.abspath(entry or os.getcwd()), rel)
        if os.path.isfile(path):
            return path
    return None


class TraceCache:
    """Reads and writes the cached trace of one model on one rank (see the module docstring)."""

    def __init__(self, store: CacheStore, config_hash: str):
        self.store = store
        self.config_hash = config_hash
        self.status = ""
        """"skipped (cached)" after a replay; "ran (<why not cached>)" after a trace."""
        self._entry: CacheEntry | None = None
        self._digest: str | None = None
        self._pending: dict[str, Any] | None = None

    # ---- warm: read and rebuild ---------------------------------------------------------------

    def _open(self, module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> CacheEntry | None:
        try:
            factors = trace_factors(module, args, kwargs, self.config_hash)
        except UnkeyableModel as exc:
            self.status = f"ran (not cacheable: {exc})"
            return None
        self._entry = self.store.entry(factors)
        return self._entry

    def load(self, module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Replay | None:
        """The replay for this call, or None (with `status` saying why) to trace instead."""
        entry = self._open(module, args, kwargs)
        if entry is None:
            return None
        found = entry.lookup(GRAPH_KEY)
        if found is None:
            self.status = "ran (no cached trace for this model, call and config)"
            return None
        self._digest, data = found
        try:
            return self._rebuild(json.loads(data), module, args, kwargs)
        except _Stale as exc:
            # Outdated, not damaged; but the trace that follows must be able to replace it.
            self.status = f"ran ({exc})"
            entry.invalidate(GRAPH_KEY, str(exc), self._digest)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self.drop(f"cached trace unusable: {type(exc).__name__}: {exc}")
            return None
        log.info("trace cache: %s", self.status)
        return None

    def drop(self, reason: str) -> None:
        """Verified bytes that do not rebuild: never run them; quarantine the record."""
        self.status = f"ran ({reason})"
        log.warning("trace cache: %s", self.status)
        if self._entry is not None and self._digest is not None:
            self._entry.invalidate(GRAPH_KEY, reason, self._digest)

    def _rebuild(self, record: dict[str, Any], module: torch.nn.Module, args: Sequence[Any],
                 kwargs: dict[str, Any]) -> Replay:
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(f"record format {record.get('format')!r}, expected {RECORD_FORMAT}")
        files = []
        for rel, hint in zip(record["traced_files"], record["file_hints"], strict=True):
            path = _resolve_source(rel, hint)
            if path is None:
                raise _Stale(f"traced source {rel} not found")
            files.append(path)
        digest, rels = code_hash(files)
        if digest != record["code_hash"] or rels != record["traced_files"]:
            raise _Stale("a traced source file changed since the trace was cached")
        split_gm = graph_codec.decode(record["split_graph"])
        n_inputs = len(split_gm.graph.find_nodes(op="placeholder"))
        specs = record["placeholders"]
        if len(specs) != n_inputs:
            raise ValueError(f"{len(specs)} placeholder bindings for {n_inputs} graph inputs")
        tensors = _named_tensors(module)
        bindings, constants = [], []
        for spec in specs:
            binding = Binding(spec["kind"], spec.get("pos"), spec.get("name"), spec.get("dim", 0), spec.get("tensor"))
            if binding.kind not in ("input", "size", "const"):
                raise ValueError(f"binding kind {binding.kind!r}")
            bindings.append(binding)
            constant = None
            if binding.kind == "const":
                constant = tensors.get(binding.tensor)
                if constant is None:
                    raise ValueError(f"the module has no parameter or buffer {binding.tensor!r}")
            else:
                _argument(binding, args, kwargs)  # the call has it
            constants.append(constant)
        out_spec = torch_internals.treespec_loads(record["out_spec"])
        return Replay(split_gm, list(record["pieces"]), bindings, constants, out_spec, files)

    # ---- cold: remember what Dynamo produced --------------------------------------------------

    def remember(self, module: torch.nn.Module, plan: Sequence[Any] | None) -> None:
        """At the backend call of a Dynamo trace: how each graph input binds, by name (to save
        once the forward's outputs proved bindable)."""
        self._pending = None
        if self._entry is None or plan is None:
            return
        names = {id(t): name for name, t in reversed(list(_named_tensors(module).items()))}
        specs = []
        for arg in plan:
            if arg.kind == "const":
                specs.append({"kind": "const", "tensor": names[id(arg.value)]})
            else:
                specs.append({"kind": arg.kind, "pos": arg.pos, "name": arg.name, "dim": arg.dim})
        self._pending = {"placeholders": specs}

    def save(self, out_spec: Any, traced_files: Sequence[str], backend: Any) -> None:
        """After a Dynamo trace whose calls bind directly: publish the record (the backend
        describes its split graph and pieces)."""
        pending, entry = self._pending, self._entry
        self._pending = None
        if pending is None or entry is None:
            return
        try:
            spec_text = torch_internals.treespec_dumps(out_spec)
            split_graph, pieces = backend.describe()
            split_gm = graph_codec.decode(split_graph)
            if len(split_gm.graph.find_nodes(op="placeholder")) != len(pending["placeholders"]):
                raise ValueError("the split graph's inputs are not the traced graph's")
        except Exception as exc:  # pytree and the codec raise assorted types for what they cannot keep
            self.status = f"ran (trace not cacheable: {exc})"
            log.info("trace cache: %s", self.status)
            return
        digest, rels = code_hash(traced_files)
        hints = {relative_source_path(f): os.path.abspath(f) for f in traced_files}
        record = {"format": RECORD_FORMAT, **pending, "split_graph": split_graph, "pieces": pieces,
                  "out_spec": spec_text, "traced_files": rels,
                  "file_hints": [hints[r] for r in rels], "code_hash": digest}
        data = json.dumps(record, sort_keys=True).encode()
        entry.get_or_compute(GRAPH_KEY, lambda: data)
        why = self.status[len("ran ("):-1] if self.status.startswith("ran (") else "first start"
        self.status = f"ran ({why}; cached for the next start)"


class _Stale(Exception):
    """A cached trace that no longer fits (a miss, not a corruption)."""


def _argument(binding: Binding, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if binding.pos is not None and binding.pos < len(args):
        return args[binding.pos]
    if binding.name is None or binding.name not in kwargs:
        raise ValueError(f"the call has no argument for graph input {binding}")
    return kwargs[binding.name]
