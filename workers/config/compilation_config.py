"""`CompilationConfig`: what kiln compiles, how, and which of it enters the config hash.

The driver validates it and hashes it; each worker rebuilds it from the JSON it receives and
checks the hash (see DESIGN.md, "Compilation semantics"). Only stdlib, pydantic and xxhash are
imported here, so `kiln config …` starts fast; torch is the business of the code that
interprets the config.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from kiln.workers.config.json_io import (
    ConfigError,
    apply_overrides,
    canonical_json,
    hash_text,
    load_json_object,
    reject_unknown_keys,
)
from kiln.workers.config.checks import (
    CAPTURE_SIZES_PLACEHOLDER,
    FIELD_CHECKS,
    check_backend,
    check_inductor_config,
    check_inductor_passes,
    expand_compile_sizes,
    fold_deprecated_flags,
    is_positive_int,
    padding_table,
)
from kiln.workers.config.modes import CompilationLevel, CUDAGraphMode
from kiln.workers.config.pass_config import PassConfig, pass_identity, pass_names, resolve_passes

__all__ = [
    "CAPTURE_SIZES_PLACEHOLDER",
    "DEFAULT_SPLITTING_OPS",
    "CompilationConfig",
    "CompilationLevel",
    "ConfigError",
    "CUDAGraphMode",
    "PassConfig",
]

logger = logging.getLogger(__name__)

DEFAULT_SPLITTING_OPS = ["kiln::attention", "aten::scaled_dot_product_attention"]
"""Splitting ops at level PIECEWISE when none are given: attention, kiln's op (its models) and
torch's scaled_dot_product_attention (unmodified models), so both split into per-layer pieces."""


class CompilationConfig(BaseModel):
    """How kiln compiles a model on every rank (see DESIGN.md, "Compilation semantics").

    Build it from keyword arguments, `from_json`, `from_cli` or `with_overrides`; every invalid
    value raises a ValueError (pydantic's ValidationError is one) naming the field and the value.
    After validation `cudagraph_mode` and `splitting_ops` hold their resolved values and the
    deprecated flags are folded into `cudagraph_mode` (and left out of dumps), so a dump loads back
    unchanged. The config is a value: what the user chose and what follows from it (resolved
    splitting ops, capture sizes, the padding table); runtime state (timings, the rank's cache
    directory, traced files, custom-op counts) lives in the objects that own it.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    level: CompilationLevel = CompilationLevel.PIECEWISE
    """0 eager, 1 torch.compile with `backend` as is, 2 Dynamo traces once, 3 piecewise (kiln's
    backend). An int or a name in any case."""

    backend: str = "inductor"
    """torch.compile backend at levels 1 and 2: "inductor", "eager", "aot_eager" or any
    registered Dynamo backend. Ignored at level 3 (see `use_inductor`)."""

    custom_ops: list[str] = []
    """Custom-op switches: at most one of "all" / "none", plus "+name" / "-name" for single ops.
    An enabled op runs its own kernel (opaque to Inductor); a disabled one runs native torch code
    that Inductor can fuse. Default: all enabled without Inductor, all disabled with it."""

    splitting_ops: list[str] | None = None
    """Ops at which level 3 splits the graph ("ns::op" or "ns::op.overload"); each occurrence
    runs eagerly between compiled pieces. None: attention at level 3 (DEFAULT_SPLITTING_OPS:
    kiln's op and torch's scaled_dot_product_attention), none otherwise."""

    use_inductor: bool = True
    """Level 3: compile the pieces with Inductor (True) or run them as traced FX code (False)."""

    compile_sizes: list[int | str] | None = None
    """Static batch sizes compiled besides the symbolic one; the entry "cudagraph_capture_sizes"
    stands for all capture sizes (expanded by `init_with_cudagraph_sizes`)."""

    inductor_compile_config: dict[str, Any] = {}
    """Inductor config overrides (JSON values; nested options spelled "triton.cudagraphs")."""

    inductor_passes: dict[str, Any] = {}
    """Custom Inductor passes: a name (a label, used in errors) → a callable taking the post-grad
    fx.Graph, or its qualified name ("pkg.mod:attr" or "pkg.mod.attr"), resolved when the config
    is built. They run as post-grad passes after kiln's own, in the order given; each pass's
    source is part of the hash."""

    cudagraph_mode: CUDAGraphMode | None = None
    """CUDA graph capture mode, a name in any case. None resolves to FULL_AND_PIECEWISE at
    level 3 and NONE otherwise. Modes with a PIECEWISE part need level 3."""

    use_cudagraph: bool = Field(default=True, exclude=True)
    """Deprecated, use `cudagraph_mode`: False means cudagraph_mode NONE. Folded into
    cudagraph_mode when the config is built; kept as given (so code that reads it sees what the
    user said) but never dumped, since cudagraph_mode carries its meaning."""

    cudagraph_num_of_warmups: int = Field(default=1, ge=0)
    """Eager warm-up runs per size before its CUDA graph is captured."""

    cudagraph_capture_sizes: list[int] | None = None
    """Batch sizes to capture CUDA graphs for. None: the caller's default list, given to
    `init_with_cudagraph_sizes`, which also de-duplicates and sorts them, largest first."""

    cudagraph_capture: Literal["eager", "lazy"] = "eager"
    """When CUDA graphs are captured. "eager": every size during `KilnModel.compile`, largest
    first (the rank is ready once all are captured). "lazy": the rank is ready once its pieces
    are compiled or loaded; a background thread then captures one size after another in
    `cudagraph_capture_order`, and a batch whose padded size is not captured yet runs the
    compiled pieces without graphs (no call ever waits for a capture). Same outputs either way;
    never part of the hash (graphs are captured after compilation). Lazy capture needs a single
    rank: with tensor parallelism the capture thread's warm-up collectives would interleave with
    the main thread's in an order that differs across ranks, so TP > 1 captures eagerly (with a
    warning in the report); so does level 1, where torch.compile may recompile on a call."""

    cudagraph_capture_order: list[int] | None = None
    """Lazy capture: the sizes to capture first, in this order (the batch sizes expected first);
    the capture sizes not named follow, smallest first. None: smallest first. Every entry must be
    a capture size (checked by `init_with_cudagraph_sizes`). Ignored by eager capture."""

    cudagraph_copy_inputs: bool = False
    """Copy inputs into the graph's static buffers (instead of the caller keeping them there)."""

    full_cuda_graph: bool = Field(default=False, exclude=True)
    """Deprecated, use `cudagraph_mode`: True means cudagraph_mode FULL. Folded into
    cudagraph_mode when the config is built; kept as given, never dumped."""

    pass_config: PassConfig = PassConfig()
    """Switches for kiln's own post-grad passes."""

    cache_dir: str = ""
    """Root of the kiln cache; "" for the default. Never part of the hash."""

    debug_dump_path: str = ""
    """Directory for debug dumps, "" for none: at level 3 each rank writes the traced graph,
    the split graph and every piece's code to `<path>/rank_<r>/` (never part of the hash). Set,
    the start always traces with Dynamo (a cached trace would have no graphs to write)."""

    # What follows from the fields, derived once (in model_post_init, then by _resolve and
    # init_with_cudagraph_sizes); never dumped, never hashed on their own. Plain assignments
    # rather than PrivateAttr(default_factory=...), which pydantic 2.13 re-inspects on every
    # instance: building a config took ~20x longer.
    _given: dict[str, Any]
    _resolved_passes: dict[str, Any]
    _max_capture_size: int
    _bs_to_padded_graph_size: list[int]

    def model_post_init(self, context: Any, /) -> None:
        # Runs after field validation and before the mode="after" validators (and also for
        # model_construct, which skips validation).
        self._given = {}
        self._resolved_passes = {}
        self._max_capture_size = 0
        self._bs_to_padded_graph_size = []

    # -----------------------------------------------------------------------------------------
    # Field validation

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        reject_unknown_keys(cls, data, "")
        return data

    @field_validator("level", mode="before")
    @classmethod
    def _parse_level(cls, value: Any) -> CompilationLevel:
        return CompilationLevel.parse(value)

    @field_validator(*FIELD_CHECKS, mode="before")
    @classmethod
    def _check_raw(cls, value: Any, info: ValidationInfo) -> Any:
        return FIELD_CHECKS[info.field_name](value)

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        return check_backend(value)

    @field_validator("inductor_compile_config")
    @classmethod
    def _check_inductor_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_inductor_config(value)

    @field_validator("inductor_passes")
    @classmethod
    def _check_inductor_passes(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_inductor_passes(value)

    @field_serializer("cudagraph_mode", when_used="json")
    def _dump_cudagraph_mode(self, value: CUDAGraphMode | None) -> str | None:
        return None if value is None else value.name

    @field_serializer("inductor_passes", when_used="json")
    def _dump_inductor_passes(self, value: dict[str, Any]) -> dict[str, str]:
        return pass_names(value)

    # -----------------------------------------------------------------------------------------
    # Resolution after the fields are valid

    @model_validator(mode="after")
    def _resolve(self) -> CompilationConfig:
        # What the caller gave, before resolution: with_overrides starts from this, so that
        # overriding `level` re-derives the defaults instead of keeping those of the old level.
        self._given = self.model_dump(include=set(self.model_fields_set))
        # (The deprecated flags are excluded from dumps; what the caller gave still counts.)
        self._given.update({name: getattr(self, name) for name in ("use_cudagraph", "full_cuda_graph")
                            if name in self.model_fields_set})
        self._resolved_passes = resolve_passes(self.inductor_passes, self.inductor_compile_config)
        self.set_splitting_ops_for_piecewise()
        self._resolve_cudagraph_mode()
        return self

    def _resolve_cudagraph_mode(self) -> None:
        """The one place cudagraph_mode is decided: the deprecated flags, the level's default,
        piecewise graphs only at level 3, and FULL where level 3 has nothing to split. (Without
        CUDA the runtime runs NONE and says so; that is a fact of the device, not of the config.)"""
        explicit_mode = self.cudagraph_mode is not None
        given = self.model_fields_set
        mode = fold_deprecated_flags(
            self.cudagraph_mode,
            self.use_cudagraph if "use_cudagraph" in given else None,
            self.full_cuda_graph if "full_cuda_graph" in given else None,
        )
        piecewise_level = self.level == CompilationLevel.PIECEWISE
        if mode is None:
            mode = CUDAGraphMode.FULL_AND_PIECEWISE if piecewise_level else CUDAGraphMode.NONE
        elif explicit_mode and not piecewise_level and mode.requires_piecewise_compilation():
            raise ValueError(
                f"cudagraph_mode: {mode.name} has piecewise CUDA graphs, which need"
                f" level=3 (PIECEWISE), got level={int(self.level)} ({self.level.name});"
                " use cudagraph_mode NONE or FULL"
            )
        if piecewise_level and not self.splitting_ops and mode.requires_piecewise_compilation():
            warnings.warn(
                f"cudagraph_mode {mode.name} needs piecewise graphs, but splitting_ops is empty,"
                " so the graph is never split; using cudagraph_mode FULL instead",
                UserWarning,
                stacklevel=2,
            )
            mode = CUDAGraphMode.FULL
        self.cudagraph_mode = mode

    def set_splitting_ops_for_piecewise(self) -> None:
        """Resolve `splitting_ops` for the level: at level 3 None becomes DEFAULT_SPLITTING_OPS
        (an empty list leaves one piece, the whole graph, and cudagraph_mode then turns a mode
        that needs piecewise graphs into FULL); at other levels None becomes []."""
        if self.splitting_ops is None:
            piecewise_level = self.level == CompilationLevel.PIECEWISE
            self.splitting_ops = list(DEFAULT_SPLITTING_OPS) if piecewise_level else []

    # -----------------------------------------------------------------------------------------
    # Custom ops

    def uses_inductor(self) -> bool:
        """Whether Inductor compiles the model (decides the custom-op default)."""
        if self.level in (CompilationLevel.DYNAMO_AS_IS, CompilationLevel.DYNAMO_ONCE):
            return self.backend == "inductor"
        return self.level == CompilationLevel.PIECEWISE and self.use_inductor

    def custom_op_enabled(self, name: str) -> bool:
        """Whether custom op `name` runs its own kernel: +name / -name, else all / none, else
        enabled exactly when Inductor is not in use (Inductor fuses the native code better)."""
        if f"+{name}" in self.custom_ops:
            return True
        if f"-{name}" in self.custom_ops:
            return False
        if "all" in self.custom_ops:
            return True
        if "none" in self.custom_ops:
            return False
        return not self.uses_inductor()

    # -----------------------------------------------------------------------------------------
    # Sizes

    def init_with_cudagraph_sizes(self, default_sizes: Sequence[int]) -> None:
        """Fix the capture sizes, expand compile_sizes and build the padding table.

        Capture sizes are `cudagraph_capture_sizes` if set, else `default_sizes`; stored back
        de-duplicated, largest first. `bs_to_padded_graph_size[b]` is the smallest capture size
        >= b for 1 <= b <= max_capture_size (index 0 holds 0); larger batches run without
        graphs. Computed whatever the cudagraph_mode (the table is the config's; only graph
        dispatch pads with it). Idempotent: once sizes are fixed, later calls keep them.
        """
        if self.cudagraph_capture_sizes is not None:
            sizes = list(self.cudagraph_capture_sizes)
        else:
            sizes = list(default_sizes)
            for size in sizes:
                if not is_positive_int(size):
                    raise ValueError(
                        f"default cudagraph capture size {size!r} is not a positive int"
                    )
        unique = sorted(set(sizes), reverse=True)
        if len(unique) != len(sizes):
            duplicates = sorted(size for size, n in collections.Counter(sizes).items() if n > 1)
            logger.info("cudagraph_capture_sizes: dropped duplicate sizes %s", duplicates)
        self.cudagraph_capture_sizes = unique
        self.compile_sizes = expand_compile_sizes(self.compile_sizes, unique)
        self._max_capture_size = unique[0] if unique else 0
        self._bs_to_padded_graph_size = padding_table(unique)
        unknown = [size for size in self.cudagraph_capture_order or [] if size not in unique]
        if unknown:
            raise ValueError(f"cudagraph_capture_order: {unknown} are not capture sizes ({unique})")

    def lazy_capture_order(self) -> list[int]:
        """The order in which lazy capture takes the capture sizes: `cudagraph_capture_order`
        first, then the rest smallest first (the sizes a server meets first: decode batches)."""
        named = list(self.cudagraph_capture_order or [])
        return named + sorted(size for size in self.cudagraph_capture_sizes or [] if size not in named)

    @property
    def max_capture_size(self) -> int:
        """Largest capture size; 0 before init_with_cudagraph_sizes or without sizes."""
        return self._max_capture_size

    @property
    def bs_to_padded_graph_size(self) -> list[int]:
        """Batch size b (0..max_capture_size) → the capture size it runs padded to."""
        return self._bs_to_padded_graph_size

    # -----------------------------------------------------------------------------------------
    # Derived

    @property
    def resolved_passes(self) -> dict[str, Any]:
        """Inductor pass hook name → the resolved callable."""
        return dict(self._resolved_passes)

    # -----------------------------------------------------------------------------------------
    # Hash

    def compile_factors(self) -> dict[str, Any]:
        """Everything that changes the compiled code, as plain JSON (explains cache misses).

        Never paths, sizes, CUDA graph settings or runtime state: sizes key cache entries, and
        CUDA graphs are captured after compilation.
        """
        return {
            "level": int(self.level),
            "backend": self.backend,
            "custom_ops": list(self.custom_ops),
            "splitting_ops": list(self.splitting_ops or []),
            "use_inductor": self.use_inductor,
            "inductor_compile_config": dict(self.inductor_compile_config),
            "pass_config": self.pass_config.model_dump(mode="json"),
            "inductor_passes": {
                name: pass_identity(name, target) for name, target in self._resolved_passes.items()
            },
        }

    def compute_hash(self) -> str:
        """xxh3-128 hex of the canonical JSON of compile_factors(); stable across processes."""
        return hash_text(canonical_json(self.compile_factors()))

    # -----------------------------------------------------------------------------------------
    # JSON and overrides

    def to_json(self, indent: int | None = 2) -> str:
        """The resolved config as JSON; `from_json` of it gives an equal config and hash."""
        # A clear error for a pass without a name, before pydantic's serializer wraps it.
        pass_names(self.inductor_passes)
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> CompilationConfig:
        """From JSON text (a string starting with "{") or a JSON file path."""
        return cls.model_validate(load_json_object(text_or_path))

    @classmethod
    def from_cli(
        cls, file: str | os.PathLike[str] | None, overrides: Sequence[str]
    ) -> CompilationConfig:
        """From an optional JSON file plus `key=value` overrides (see `with_overrides`)."""
        data = load_json_object(file) if file is not None else {}
        return cls.model_validate(apply_overrides(data, overrides, cls))

    def with_overrides(self, overrides: Sequence[str]) -> CompilationConfig:
        """A new config: the fields given to this one, plus dotted `key=value` overrides.

        `level=3`, `pass_config.enable_noop=false`, `compile_sizes=[1,2,4]`,
        `cudagraph_mode=full`, `custom_ops=["none","+rms_norm"]`: a value is JSON if it parses,
        else plain text. Derived values (cudagraph_mode's default, splitting_ops) are derived
        anew; runtime state is not carried over.
        """
        data = apply_overrides(_copy_containers(self._given), overrides, type(self))
        return type(self).model_validate(data)

    def __eq__(self, other: object) -> bool:
        # Config fields, and passes by what they resolve to: a callable equals its qualified name after a JSON round trip.
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, CompilationConfig)
        # The deprecated flags are folded into cudagraph_mode (and not dumped): compare that.
        skip = {"inductor_passes", "use_cudagraph", "full_cuda_graph"}
        fields = (name for name in type(self).model_fields if name not in skip)
        return all(getattr(self, f) == getattr(other, f) for f in fields) and (
            self._resolved_passes == other._resolved_passes
        )

    __hash__ = None  # type: ignore[assignment]  # mutable


def _copy_containers(value: Any) -> Any:
    """Copy dicts and lists recursively; leaves (callables included) are shared."""
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value
