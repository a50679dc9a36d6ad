"""Plumbing for `CompilationConfig`: canonical JSON and hashing, JSON files, `key=value` overrides.

Nothing here knows the config's fields: overrides are checked against whatever pydantic model
they are applied to, so `PassConfig` and `CompilationConfig` share the same rules. No torch.
"""

from __future__ import annotations

import difflib
import json
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

# kiln's one canonical JSON and hash, re-exported for the config modules.
from kiln.cache.digest import canonical_json, digest_text as hash_text  # noqa: F401


class ConfigError(ValueError):
    """A config file, JSON text or override that cannot be read (as opposed to an invalid value)."""


def close_matches_hint(word: str, candidates: Iterable[str]) -> str:
    """`" (did you mean 'x' or 'y'?)"`, or `""` when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ""
    quoted = [repr(match) for match in matches]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {listed}?)"


def reject_unknown_keys(model: type[BaseModel], data: Any, where: str) -> None:
    """Raise a ValueError naming the first unknown key of `data` and the close field names.

    pydantic's own `extra="forbid"` error says only "Extra inputs are not permitted"; a typo
    deserves the field it was meant to be.
    """
    if not isinstance(data, Mapping):
        return
    for key in data:
        if key not in model.model_fields:
            name = f"{where}.{key}" if where else str(key)
            raise ValueError(
                f"unknown field {name!r}{close_matches_hint(str(key), model.model_fields)}"
            )


# ---------------------------------------------------------------------------------------------
# JSON text and files


def load_json_object(text_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON object from text (a string starting with "{") or from a file path."""
    if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
        source, text = "JSON text", text_or_path
    else:
        path = Path(text_or_path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid JSON in {source}, line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object, not {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# Dotted key=value overrides


def parse_override(item: str) -> tuple[list[str], str]:
    """Split `"a.b=value"` into (["a", "b"], "value")."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. level=3")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"malformed override {item!r}: empty component in key {key!r}")
    return parts, raw


def parse_override_value(raw: str) -> Any:
    """JSON if it parses (`3`, `false`, `[1,2]`, `null`, `"x"`), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every settable key of `model`, nested models included (for hints)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_all_keys(field.annotation, f"{prefix}{name}."))
    return keys


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], model: type[BaseModel]
) -> dict[str, Any]:
    """Apply `key=value` overrides to the raw input `data` of `model`, in place; returns `data`.

    Keys walk nested models (`pass_config.enable_noop`); below a dict field the rest of the key
    is one dict key, dots included (`inductor_compile_config.triton.cudagraphs=true` sets the
    Inductor option "triton.cudagraphs"), since Inductor spells its nested options that way.
    A value that parses as JSON is used as such, except for plain `str` fields, which take the
    text verbatim (`cache_dir=2024` is the directory "2024").
    """
    for item in overrides:
        parts, raw = parse_override(item)
        key = ".".join(parts)
        node, current = data, model
        for depth, part in enumerate(parts):
            field = current.model_fields.get(part)
            if field is None:
                hint = close_matches_hint(key, _all_keys(model))
                raise ConfigError(f"unknown config key {key!r} in override {item!r}{hint}")
            annotation = field.annotation
            last = depth == len(parts) - 1
            if last:
                value = parse_override_value(raw)
                if annotation is str and not isinstance(value, str):
                    value = raw
                node[part] = value
                break
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                child = node.get(part)
                if isinstance(child, BaseModel):
                    child = child.model_dump()
                node[part] = child if isinstance(child, dict) else {}
                node, current = node[part], annotation
                continue
            if typing.get_origin(annotation) is dict:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, Mapping) else {}
                node[part][".".join(parts[depth + 1 :])] = parse_override_value(raw)
                break
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts[: depth + 1])!r} has no sub-keys"
            )
    return data


# ---------------------------------------------------------------------------------------------
# Error messages for humans (the CLI)


def describe_config_error(exc: Exception) -> str:
    """One line for a config error: each problem with the field it concerns and the bad value."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        problems.append(msg if not loc or msg.startswith(loc) else f"{loc}: {msg}")
    return "invalid config: " + "; ".join(problems)
