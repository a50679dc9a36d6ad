"""Validation rules and size tables for `CompilationConfig`, as plain functions.

Each `check_*` takes the raw value of one field and returns it (normalised) or raises a
ValueError whose message names the field and the bad entry; pydantic adds the location. No
torch, no pydantic models: the rules can be read and tested on their own.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from kiln.workers.config.modes import CUDAGraphMode

DEFAULT_CAPTURE_SIZES = [1, 2, 4] + list(range(8, 257, 8))
"""Capture sizes when none are given (35 sizes, as vLLM-style servers use): the one default of
KilnModel, the driver and `kiln warmup`."""

CAPTURE_SIZES_PLACEHOLDER = "cudagraph_capture_sizes"
"""The compile_sizes entry that stands for every CUDA graph capture size."""

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_CUSTOM_OP_TOGGLE = re.compile(rf"[+-]{_IDENT}")
_SPLITTING_OP = re.compile(rf"{_IDENT}::{_IDENT}(\.{_IDENT})?")
_DOTTED_OP = re.compile(rf"{_IDENT}\.{_IDENT}(\.{_IDENT})?")


def is_positive_int(value: Any) -> bool:
    """A real int > 0 (bools are ints to Python, but `True` is no batch size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require_list(field: str, value: Any) -> list[Any]:
    # Sets would make the order, hence the hash, depend on PYTHONHASHSEED: lists only.
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field}: expected a list, got {type(value).__name__} {value!r}")
    return list(value)


def check_custom_ops(value: Any) -> list[str]:
    """At most one of "all"/"none", then "+name"/"-name"; no op both enabled and disabled."""
    entries = _require_list("custom_ops", value)
    switches = [entry for entry in entries if entry in ("all", "none")]
    if len(switches) > 1:
        raise ValueError(f"custom_ops: at most one of 'all' / 'none', got {switches}")
    for entry in entries:
        if entry not in ("all", "none") and not (
            isinstance(entry, str) and _CUSTOM_OP_TOGGLE.fullmatch(entry)
        ):
            raise ValueError(
                f"custom_ops: invalid entry {entry!r}; expected 'all', 'none', '+name' or"
                " '-name' (name: letters, digits and _, not starting with a digit)"
            )
    enabled = {entry[1:] for entry in entries if entry[0] == "+"}
    disabled = {entry[1:] for entry in entries if entry[0] == "-"}
    both = sorted(enabled & disabled)
    if both:
        raise ValueError(f"custom_ops: op {both[0]!r} is both enabled ('+') and disabled ('-')")
    return entries


def check_splitting_ops(value: Any) -> list[str] | None:
    """None, or op names "namespace::op" / "namespace::op.overload". The dotted spelling
    "namespace.op" (and "namespace.op.overload") that ported configs use is accepted and
    normalised to "namespace::op", so both spellings mean, and hash, the same."""
    if value is None:
        return None
    entries = _require_list("splitting_ops", value)
    normalised = []
    for entry in entries:
        if isinstance(entry, str) and "::" not in entry and _DOTTED_OP.fullmatch(entry):
            entry = entry.replace(".", "::", 1)
        if not (isinstance(entry, str) and _SPLITTING_OP.fullmatch(entry)):
            raise ValueError(
                f"splitting_ops: invalid op name {entry!r}; expected 'namespace::op',"
                " 'namespace::op.overload' or 'namespace.op'"
            )
        normalised.append(entry)
    return normalised


def check_compile_sizes(value: Any) -> list[int | str] | None:
    """None, or positive ints and the string "cudagraph_capture_sizes"."""
    if value is None:
        return None
    entries = _require_list("compile_sizes", value)
    for entry in entries:
        if not (is_positive_int(entry) or entry == CAPTURE_SIZES_PLACEHOLDER):
            raise ValueError(
                f"compile_sizes: invalid entry {entry!r}; expected a positive int or"
                f" {CAPTURE_SIZES_PLACEHOLDER!r}"
            )
    return entries


def check_capture_sizes(value: Any) -> list[int] | None:
    """None, or positive ints."""
    if value is None:
        return None
    return _positive_ints("cudagraph_capture_sizes", value)


def _positive_ints(field: str, value: Any) -> list[int]:
    entries = _require_list(field, value)
    for entry in entries:
        if not is_positive_int(entry):
            raise ValueError(f"{field}: invalid entry {entry!r}; expected a positive int")
    return entries


def check_capture_order(value: Any) -> list[int] | None:
    """None, or distinct positive ints (whether they are capture sizes is known only once the
    sizes are fixed: `init_with_cudagraph_sizes` checks that)."""
    if value is None:
        return None
    entries = _positive_ints("cudagraph_capture_order", value)
    duplicates = sorted({entry for entry in entries if entries.count(entry) > 1})
    if duplicates:
        raise ValueError(f"cudagraph_capture_order: sizes {duplicates} appear more than once")
    return entries


def check_capture_timing(value: Any) -> Any:
    """"eager" or "lazy", in any case."""
    if isinstance(value, str) and value.lower() in ("eager", "lazy"):
        return value.lower()
    raise ValueError(f"cudagraph_capture: expected 'eager' or 'lazy', got {value!r}")


def check_warmups(value: Any) -> Any:
    """Reject bools early (pydantic would read True as 1); the bound is the field's `ge=0`."""
    if isinstance(value, bool):
        raise ValueError(f"cudagraph_num_of_warmups: expected an int >= 0, got {value!r}")
    return value


def check_cudagraph_mode(value: Any) -> CUDAGraphMode | None:
    """None, a member, or a member's name in any case."""
    if value is None:
        return None
    try:
        return CUDAGraphMode.parse(value)
    except ValueError as exc:
        raise ValueError(f"cudagraph_mode: {exc}") from None


def check_path(value: Any) -> Any:
    """Accept os.PathLike for the str path fields."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "custom_ops": check_custom_ops,
    "splitting_ops": check_splitting_ops,
    "compile_sizes": check_compile_sizes,
    "cudagraph_capture_sizes": check_capture_sizes,
    "cudagraph_num_of_warmups": check_warmups,
    "cudagraph_capture": check_capture_timing,
    "cudagraph_capture_order": check_capture_order,
    "cudagraph_mode": check_cudagraph_mode,
    "cache_dir": check_path,
    "debug_dump_path": check_path,
}
"""Field name → its check, run on the raw input before pydantic's own type validation."""


def check_backend(value: str) -> str:
    if not value.strip():
        raise ValueError(f"backend: must name a torch.compile backend, got {value!r}")
    return value


def check_inductor_config(value: dict[str, Any]) -> dict[str, Any]:
    """Every value JSON-serializable (it is hashed and sent to workers as JSON).

    Returned as JSON would give it back (tuples become lists), so that the config a worker
    rebuilds from JSON equals the driver's.
    """
    normalised = {}
    for key, item in value.items():
        try:
            normalised[key] = json.loads(json.dumps(item, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"inductor_compile_config.{key}: value {item!r} is not JSON-serializable"
                f" ({exc}); custom passes go in inductor_passes"
            ) from None
    return normalised


def check_inductor_passes(value: dict[str, Any]) -> dict[str, Any]:
    """Non-empty names; each target a callable or a qualified-name string (resolved later)."""
    for name, target in value.items():
        if not name.strip():
            raise ValueError("inductor_passes: empty pass name")
        if not (isinstance(target, str) or callable(target)):
            raise ValueError(
                f"inductor_passes.{name}: expected a callable or a qualified name, got"
                f" {type(target).__name__} {target!r}"
            )
    return value


def fold_deprecated_flags(
    mode: CUDAGraphMode | None, use_cudagraph: bool | None, full_cuda_graph: bool | None
) -> CUDAGraphMode | None:
    """cudagraph_mode after the deprecated flags the caller gave (None: not given):
    use_cudagraph=False → NONE, full_cuda_graph=True → FULL, each with a DeprecationWarning.
    As in the configs kiln's is ported from, only a flag that asks for something (no graphs, full
    graphs) conflicts with an explicit mode; use_cudagraph=True or full_cuda_graph=False beside
    one is accepted (and warned about) and changes nothing."""
    flags = {"use_cudagraph": use_cudagraph, "full_cuda_graph": full_cuda_graph}
    given = [name for name, value in flags.items() if value is not None]
    if not given:
        return mode
    if use_cudagraph is False and full_cuda_graph is True:
        raise ValueError(
            "use_cudagraph=False and full_cuda_graph=True contradict each other (no CUDA graphs"
            " vs full CUDA graphs); set cudagraph_mode instead"
        )
    asking = [name for name in given if (name, flags[name]) in (("use_cudagraph", False), ("full_cuda_graph", True))]
    if mode is not None and asking:
        settings = ", ".join(f"{name}={flags[name]}" for name in asking)
        raise ValueError(
            f"{' and '.join(asking)} (deprecated) and cudagraph_mode are mutually exclusive; set"
            f" only cudagraph_mode (got cudagraph_mode={mode.name}, {settings})"
        )
    for name in given:
        # stacklevel is moot inside pydantic's validation; the message says what to change.
        warnings.warn(
            f"{name} is deprecated; set cudagraph_mode instead", DeprecationWarning, stacklevel=2
        )
    if mode is not None:
        return mode
    if use_cudagraph is False:
        return CUDAGraphMode.NONE
    if full_cuda_graph is True:
        return CUDAGraphMode.FULL
    return None


# ---------------------------------------------------------------------------------------------
# Sizes


def expand_compile_sizes(
    entries: Iterable[int | str] | None, capture_sizes: list[int]
) -> list[int]:
    """compile_sizes with the placeholder replaced by the capture sizes: unique, largest first."""
    sizes: set[int] = set()
    for entry in entries or []:
        if entry == CAPTURE_SIZES_PLACEHOLDER:
            sizes.update(capture_sizes)
        else:
            sizes.add(int(entry))
    return sorted(sizes, reverse=True)


def padding_table(capture_sizes: Iterable[int]) -> list[int]:
    """List t of length max+1: t[b] = smallest capture size >= b, t[0] = 0 ([0] if no sizes).

    One pass over the batch sizes: dispatch indexes it on every forward, so lookups are O(1).
    """
    ascending = sorted(set(capture_sizes))
    largest = ascending[-1] if ascending else 0
    table = [0] * (largest + 1)
    index = 0
    for batch in range(1, largest + 1):
        # Sizes are distinct, so the next one is >= batch once the current one is passed.
        if ascending[index] < batch:
            index += 1
        table[batch] = ascending[index]
    return table
