"""`PassConfig` (kiln's own post-grad passes) and the helpers behind `inductor_passes`.

Inductor passes are user callables named in the config. This module resolves qualified names
to objects, turns objects back into names for JSON, and gives each pass an identity for the
config hash. No torch import: a pass module may import torch, but only when it is resolved.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import keyword
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from kiln.workers.config.json_io import canonical_json, hash_text, reject_unknown_keys

# Flags that exist so configs written for vLLM-style stacks read the same way, but whose passes
# kiln has not written yet. Turning one on is an error: a silently ignored fusion flag would
# report a configuration that never ran.
UNIMPLEMENTED_PASSES = (
    "enable_fusion",
    "enable_attn_fusion",
    "enable_sequence_parallelism",
    "enable_async_tp",
    "enable_fi_allreduce_fusion",
)


class PassConfig(BaseModel):
    """Switches for kiln's own post-grad passes (run by Inductor inside the kiln backend)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enable_noop: bool = True
    """Remove redundant view/reshape/slice ops (no-op elimination) before Inductor lowers."""

    enable_fusion: bool = False
    """Fuse RMSNorm and activation with quantization. Not implemented in kiln yet."""

    enable_attn_fusion: bool = False
    """Fuse attention output with quantization. Not implemented in kiln yet."""

    enable_sequence_parallelism: bool = False
    """Rewrite all-reduce + norm into sequence-parallel reduce-scatter/all-gather. Not
    implemented in kiln yet."""

    enable_async_tp: bool = False
    """Overlap tensor-parallel collectives with GEMMs. Not implemented in kiln yet."""

    enable_fi_allreduce_fusion: bool = False
    """Fuse all-reduce with the following norm (FlashInfer kernels). Not implemented in kiln
    yet."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        reject_unknown_keys(cls, data, "pass_config")
        return data

    @field_validator(*UNIMPLEMENTED_PASSES)
    @classmethod
    def _not_implemented(cls, value: bool, info: Any) -> bool:
        if value:
            raise ValueError(f"pass_config.{info.field_name}: not implemented yet in kiln")
        return value

    def uuid(self) -> str:
        """Stable hash of all flags (same across processes and PYTHONHASHSEED values)."""
        return hash_text(canonical_json(self.model_dump(mode="json")))


# ---------------------------------------------------------------------------------------------
# Inductor passes: names <-> objects, and identities for the hash


def _is_dotted_identifier(text: str) -> bool:
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def resolve_qualified_name(name: str) -> Any:
    """The object named `"pkg.mod:attr.path"` or `"pkg.mod.attr"` (importing the module).

    In the dotted form the longest importable module prefix wins, so `"pkg.mod.Class.method"`
    works. Raises LookupError when nothing by that name exists; errors raised while importing
    an existing module propagate (they are bugs in that module, not a wrong name).
    """
    text = name.strip()
    module_part, colon, attr_part = text.partition(":")
    if colon:
        candidates = [(module_part, attr_part)]
        well_formed = _is_dotted_identifier(module_part) and _is_dotted_identifier(attr_part)
    else:
        parts = text.split(".")
        splits = range(len(parts) - 1, 0, -1)
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in splits]
        well_formed = len(parts) >= 2 and _is_dotted_identifier(text)
    if not well_formed:
        raise LookupError("not a qualified name; expected 'pkg.module:attr' or 'pkg.module.attr'")

    missing = ""
    for module_name, attr_path in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing *target* module means "try a shorter prefix"; a missing dependency
            # of an existing module is a real error worth showing as is.
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                missing = missing or f"no module named {exc.name!r}"
                continue
            raise
        obj: Any = module
        for attr in attr_path.split("."):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise LookupError(
                    f"module {module_name!r} has no attribute {attr_path!r}"
                ) from None
        return obj
    raise LookupError(missing)


def qualified_name_of(obj: Any) -> str | None:
    """`"module:qualname"` that resolves back to `obj` in another process, or None.

    Functions and classes use their own `__module__`/`__qualname__`; an instance is found as a
    module-level attribute of its class's module. Objects of `__main__` or of local scopes are
    not importable by name elsewhere, hence None.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    candidate = None
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        candidate = f"{module}:{qualname}"
    else:
        module = type(obj).__module__
        namespace = vars(sys.modules[module]) if module in sys.modules else {}
        for attr, value in namespace.items():
            if value is obj:
                candidate = f"{module}:{attr}"
                break
    if candidate is None or module == "__main__":
        return None
    try:
        resolved = resolve_qualified_name(candidate)
    except Exception:  # noqa: BLE001 - any failure means "not importable back"
        return None
    # Bound methods are fresh objects on each attribute access, hence == as well as `is`.
    return candidate if resolved is obj or resolved == obj else None


def pass_identity(name: str, obj: Any) -> str:
    """What the config hash records for inductor pass `name`.

    A pass with a `uuid()` method decides its own identity (Inductor's CustomGraphPass
    convention): use it when the pass depends on more than its own source. Otherwise the
    xxh3-128 of the source of the function or class (for an instance: of its class); state held
    by an instance and code it calls are not covered.
    """
    if not inspect.isclass(obj):
        uuid = getattr(obj, "uuid", None)
        if callable(uuid):
            value = uuid()
            if value is None:
                raise ValueError(f"cannot hash inductor pass {name!r}: its uuid() returned None")
            return "uuid:" + (value.hex() if isinstance(value, bytes) else str(value))
    if isinstance(obj, functools.partial):
        # Its class's source is functools.py: every partial would hash alike.
        raise ValueError(
            f"cannot hash inductor pass {name!r}: a functools.partial has no source of its own;"
            " give it a uuid() method"
        )
    target = obj if inspect.isclass(obj) or inspect.isroutine(obj) else type(obj)
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        raise ValueError(
            f"cannot hash inductor pass {name!r}: no source; give it a uuid() method"
        ) from None
    return "source:" + hash_text(source)


def resolve_passes(
    passes: dict[str, Any], inductor_compile_config: dict[str, Any]
) -> dict[str, Any]:
    """Pass hook name → callable, importing qualified names; errors name the pass and string."""
    resolved = {}
    for name, target in passes.items():
        if name in inductor_compile_config:
            raise ValueError(
                f"inductor_passes.{name}: also set in inductor_compile_config; set it once"
            )
        if isinstance(target, str):
            try:
                obj = resolve_qualified_name(target)
            except Exception as exc:  # noqa: BLE001 - whatever failed, it failed for this pass
                # A wrong name explains itself; a failing import needs its exception type.
                reason = exc if isinstance(exc, LookupError) else f"{type(exc).__name__}: {exc}"
                raise ValueError(
                    f"inductor_passes.{name}: cannot resolve {target!r}: {reason}"
                ) from None
            if not callable(obj):
                raise ValueError(
                    f"inductor_passes.{name}: {target!r} is a {type(obj).__name__}, not a callable"
                )
            target = obj
        resolved[name] = target
    return resolved


def pass_names(passes: dict[str, Any]) -> dict[str, str]:
    """Pass hook name → qualified name, for JSON; an error names a pass that has none."""
    names = {}
    for name, target in passes.items():
        qualified = target if isinstance(target, str) else qualified_name_of(target)
        if qualified is None:
            raise ValueError(
                f"inductor_passes.{name}: cannot write {target!r} as JSON: it cannot be imported"
                " back by a qualified name; define it at module level of an importable module"
            )
        names[name] = qualified
    return names
