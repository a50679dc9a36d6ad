"""A safetensors checkpoint on disk: which file holds which tensor, checked before anything is read,
then each rank's slices read straight to its device.

Layouts: `model.safetensors.index.json` (a `weight_map` of tensor name → file, as sharded
checkpoints have) or, without an index, every `*.safetensors` file of the directory.

Every file's header is parsed up front and checked against the file's size, so a truncated or
foreign file is named (with the first tensor that lies past its end) before any weight is read.
Then the rank's plan (its `WeightSlice`s) is checked against the headers: missing tensors,
unexpected ones, wrong full shapes and non-floating dtypes are errors naming the file and the
tensor. Only after that are the slices read, each through `safe_open(...).get_slice`, which
touches only the slice's bytes.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from kiln.workers.layers.shards import Placed

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes → torch dtypes kiln loads (floating point; anything else is refused)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
ELEMENT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Tensors some checkpoints carry that are not weights (rotary tables saved by old conversions).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint kiln cannot load; the message names the file and, where one is to blame, the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    """Path of the safetensors file that holds the tensor."""
    dtype: str
    """safetensors dtype code, e.g. "BF16"."""
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a checkpoint directory, by name (headers only; no weight read yet)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        self.files = files = self._files()
        for file in files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self.tensors[name].file}")
                self.tensors[name] = info
        self._check_index(files)

    def _files(self) -> list[str]:
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map: dict[str, str] | None = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: cannot read its weight_map: {exc}") from None
            names = sorted(set(self.weight_map.values()))
            files = [os.path.join(self.directory, n) for n in names]
            for file in files:
                if not os.path.isfile(file):
                    raise CheckpointError(f"{index} names {os.path.basename(file)!r}, which is not in {self.directory}")
            return files
        self.weight_map = None
        files = sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory) if n.endswith(".safetensors"))
        if not files:
            pickled = sorted(n for n in os.listdir(self.directory) if n.endswith((".bin", ".pt", ".pth")))
            found = f" (found {', '.join(pickled)}: only safetensors is read)" if pickled else ""
            raise CheckpointError(f"{self.directory}: no *.safetensors files (and no {INDEX_FILE}){found}; "
                                  "use load_format='dummy' to build the model from config.json alone")
        return files

    def _check_index(self, files: list[str]) -> None:
        if self.weight_map is None:
            return
        index = os.path.join(self.directory, INDEX_FILE)
        for name, file in sorted(self.weight_map.items()):
            info = self.tensors.get(name)
            where = os.path.join(self.directory, file)
            if info is None:
                raise CheckpointError(f"{where}: tensor {name!r} is missing ({INDEX_FILE} puts it there)")
            if os.path.normpath(info.file) != os.path.normpath(where):
                raise CheckpointError(f"{info.file}: holds tensor {name!r}, which {index} puts in {file}")

    def check(self, plan: list[Placed], *, allowed_extra: tuple[str, ...] = ()) -> None:
        """Every tensor the plan reads exists with its full shape and a floating dtype, and the
        checkpoint holds nothing else (besides `allowed_extra` names and non-weights)."""
        wanted: dict[str, tuple[int, ...]] = {}
        for _, piece in plan:
            wanted.setdefault(piece.source, piece.full_shape)
        for name, shape in wanted.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self._where(name)}: tensor {name!r} is missing "
                                      f"(expected shape {list(shape)})")
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"expected {list(shape)} from config.json")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected a floating "
                                      f"dtype ({', '.join(FLOAT_DTYPES)}); quantized checkpoints are not supported")
        extra = sorted(n for n in self.tensors if n not in wanted and n not in allowed_extra
                       and not n.endswith(IGNORED_SUFFIXES))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{self.tensors[extra[0]].file}: unexpected tensor {extra[0]!r}{more}: "
                                  "not part of the architecture config.json describes")

    def _where(self, name: str) -> str:
        if self.weight_map is not None and name in self.weight_map:
            return os.path.join(self.directory, self.weight_map[name])
        return self.files[0] if len(self.files) == 1 else f"{self.directory} ({len(self.files)} files)"

    def first_dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's tensors (of the first floating one, by name)."""
        for name in sorted(self.tensors):
            code = self.tensors[name].dtype
            if code in FLOAT_DTYPES:
                return FLOAT_DTYPES[code]
        return None

    def load(self, plan: list[Placed], device: torch.device) -> tuple[int, float]:
        """Read the plan's slices into their parameters; returns (bytes read, seconds)."""
        from safetensors import safe_open

        by_file: dict[str, list[Placed]] = defaultdict(list)
        for placed in plan:
            by_file[self.tensors[placed[1].source].file].append(placed)
        t0 = time.perf_counter()
        total = 0
        target = "cpu" if device.type == "cpu" else str(device)
        for file, items in sorted(by_file.items()):
            try:
                with safe_open(file, framework="pt", device=target) as f:
                    for param, piece in items:
                        total += _read_slice(f, param, piece)
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors' own errors name no file
                raise CheckpointError(f"{file}: reading failed: {type(exc).__name__}: {exc}") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return total, time.perf_counter() - t0


def _read_slice(f, param: torch.Tensor, piece) -> int:
    if piece.length == 0:  # a rank that holds only padding rows of the vocabulary
        return 0
    sl = f.get_slice(piece.source)
    index = tuple(slice(piece.start, piece.start + piece.length) if d == piece.dim else slice(None)
                  for d in range(len(piece.full_shape)))
    values = sl[index]
    piece.destination(param).copy_(values)
    return values.numel() * ELEMENT_BYTES[sl.get_dtype()]


def read_header(file: str) -> dict[str, TensorInfo]:
    """A safetensors file's tensors, from its header, after checking that the file is whole."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated ({size} bytes; not even a safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise CheckpointError(f"{file}: truncated or not a safetensors file (its header claims "
                                      f"{length} bytes, the file has {size})")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{file}: not a safetensors file (header is not JSON: {exc})") from None
    data = size - 8 - length
    out: dict[str, TensorInfo] = {}
    past_end = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(file, str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}") from None
        if end > data:
            past_end.append((begin, name))
        out[name] = info
    if past_end:
        _, first = min(past_end)
        more = f" (and {len(past_end) - 1} more)" if len(past_end) > 1 else ""
        raise CheckpointError(f"{file}: truncated: {data} data bytes present, tensor {first!r}{more} "
                              "lies past the end of the file")
    return out
