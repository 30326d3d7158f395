"""Model weights <-> one flat little-endian float32 vector plus a manifest.

The manifest (names, shapes, dtypes) travels as a small protobuf message;
the vector travels as chunks of about 1 MiB in gRPC streams, so no message
ever approaches gRPC's 4 MiB default limit whatever the model size. All
conversions are single vectorized copies: no Python loop over elements.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the server serves without it
    import torch

from common.pb import tensor_pb2

CHUNK_BYTES = 1 << 20
"""Default size of one data chunk in streams (1 MiB)."""

MAX_CHUNK_BYTES = (4 << 20) - 1024
"""Largest data chunk accepted: gRPC's 4 MiB default message limit less framing headroom."""

WIRE_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class TensorInfo:
    """Name and shape of one tensor inside a flat vector (always float32)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Manifest:
    """Layout of a flat vector: tensors in order, no padding."""

    tensors: tuple[TensorInfo, ...]

    @property
    def total_elements(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return self.total_elements * WIRE_DTYPE.itemsize

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Manifest:
        return cls(tuple(TensorInfo(k, tuple(v.shape)) for k, v in state.items()))

    def to_proto(self) -> tensor_pb2.Manifest:
        return tensor_pb2.Manifest(
            tensors=[
                tensor_pb2.TensorSpec(name=t.name, shape=t.shape, dtype=tensor_pb2.DTYPE_FLOAT32)
                for t in self.tensors
            ],
            total_elements=self.total_elements,
        )

    @classmethod
    def from_proto(cls, msg: tensor_pb2.Manifest) -> Manifest:
        """Parse a manifest; raises ValueError when it is inconsistent."""
        tensors = []
        for spec in msg.tensors:
            if spec.dtype != tensor_pb2.DTYPE_FLOAT32:
                raise ValueError(f"tensor {spec.name!r}: only DTYPE_FLOAT32 is supported")
            if any(s < 0 for s in spec.shape):
                raise ValueError(f"tensor {spec.name!r}: negative dimension in {list(spec.shape)}")
            tensors.append(TensorInfo(spec.name, tuple(int(s) for s in spec.shape)))
        manifest = cls(tuple(tensors))
        if msg.total_elements != manifest.total_elements:
            raise ValueError(
                f"manifest total_elements {msg.total_elements} != sum of shapes "
                f"{manifest.total_elements}"
            )
        return manifest

    def to_json(self) -> list[dict[str, object]]:
        return [{"name": t.name, "shape": list(t.shape)} for t in self.tensors]

    @classmethod
    def from_json(cls, data: list[dict[str, object]]) -> Manifest:
        return cls(
            tuple(
                TensorInfo(str(d["name"]), tuple(int(s) for s in d["shape"]))  # type: ignore[attr-defined]
                for d in data
            )
        )


def flatten_state_dict(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate all tensors into one contiguous float32 vector (one copy)."""
    if not state:
        return np.zeros(0, dtype=WIRE_DTYPE)
    import torch

    flat = torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in state.values()])
    return flat.numpy().astype(WIRE_DTYPE, copy=False)


def unflatten_to_state_dict(vector: np.ndarray, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Split a flat vector into named tensors; they share memory with a copy of vector."""
    if vector.shape != (manifest.total_elements,):
        raise ValueError(
            f"vector has {vector.size} elements, manifest expects {manifest.total_elements}"
        )
    import torch

    base = torch.from_numpy(np.array(vector, dtype=np.float32, copy=True))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for t in manifest.tensors:
        out[t.name] = base[offset : offset + t.numel].view(t.shape)
        offset += t.numel
    return out


def load_flat_into_module(module: torch.nn.Module, vector: np.ndarray) -> None:
    """Copy a flat vector into a module's state dict (manifest order = state_dict order)."""
    manifest = Manifest.from_state_dict(module.state_dict())
    module.load_state_dict(unflatten_to_state_dict(vector, manifest))


def to_wire(vector: np.ndarray) -> bytes:
    """Little-endian float32 bytes of a vector."""
    return np.ascontiguousarray(vector, dtype=WIRE_DTYPE).tobytes()


def from_wire(data: bytes | memoryview) -> np.ndarray:
    """Read-only float32 view of little-endian bytes; raises ValueError on a ragged length."""
    if len(data) % WIRE_DTYPE.itemsize:
        raise ValueError(f"{len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype=WIRE_DTYPE)


def iter_chunks(data: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Slices of data of chunk_bytes each (the last may be shorter)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkAssembler:
    """Receives a stream of data chunks into one preallocated buffer.

    Refuses, with ValueError, a chunk that would exceed the declared size,
    an oversized chunk, or a ragged float boundary at the end; `finish()`
    refuses a stream that stopped short. Memory is the declared size, once.

    With keep_chunks, read-only chunks (bytes, or views of them: gRPC's message
    buffers) are kept as they are instead of copied, and `finish_parts()` hands
    them out as consecutive views; the buffer is written only by `finish()` or
    when a chunk boundary splits a value.
    """

    def __init__(
        self, total_bytes: int, buffer: np.ndarray | None = None, keep_chunks: bool = False
    ) -> None:
        if total_bytes % WIRE_DTYPE.itemsize:
            raise ValueError(f"declared size {total_bytes} is not a multiple of 4 bytes")
        n = total_bytes // WIRE_DTYPE.itemsize
        if buffer is None:
            buffer = np.empty(n, dtype=WIRE_DTYPE)
        elif buffer.dtype != WIRE_DTYPE or buffer.size < n:
            raise ValueError("staging buffer too small or of the wrong dtype")
        self._buffer = buffer[:n]
        self._bytes = memoryview(self._buffer.view(np.uint8))  # type: ignore[arg-type]
        self.total_bytes = total_bytes
        self.received = 0
        self._kept: list[memoryview] | None = [] if keep_chunks else None

    def add(self, chunk: bytes | memoryview) -> None:
        size = len(chunk)
        if size > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk of {size} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if self.received + size > self.total_bytes:
            raise ValueError(
                "stream exceeds its declared size: "
                f"{self.received + size} > {self.total_bytes} bytes"
            )
        if self._kept is not None:
            view = memoryview(chunk)
            # Only what nobody can change may be kept uncopied.
            self._kept.append(view if view.readonly else memoryview(bytes(view)))
        else:
            self._bytes[self.received : self.received + size] = chunk  # one memcpy
        self.received += size

    def _check_complete(self) -> None:
        if self.received != self.total_bytes:
            raise ValueError(
                f"stream truncated: received {self.received} of {self.total_bytes} declared bytes"
            )

    def finish(self) -> np.ndarray:
        self._check_complete()
        if self._kept is not None:
            offset = 0
            for part in self._kept:
                self._bytes[offset : offset + len(part)] = part
                offset += len(part)
            self._kept = None
        return self._buffer

    def finish_parts(self) -> list[np.ndarray]:
        """The whole stream as consecutive WIRE_DTYPE views of the kept chunks, uncopied.

        When a chunk's length is not a whole number of values (a sender may cut its
        stream anywhere), the chunks are copied into the buffer and that is the one part.
        """
        self._check_complete()
        if self._kept is None or any(len(p) % WIRE_DTYPE.itemsize for p in self._kept):
            return [self.finish()]
        return [np.frombuffer(p, dtype=WIRE_DTYPE) for p in self._kept if len(p)]


class FramedChunk:
    """A stream message `oneof part { Header header = 1; bytes data = 2; }` read without copying.

    Upload streams carry hundreds of megabytes; parsing each chunk with
    protobuf and then reading `.data` copies every byte twice. This reads the
    wire format directly (one length-delimited field) and exposes `data` as a
    memoryview into the received buffer. Anything else (no field, several
    fields, another field number or wire type) raises ValueError.
    """

    __slots__ = ("_field", "_payload")

    def __init__(self, raw: bytes) -> None:
        view = memoryview(raw)
        if not view:
            self._field, self._payload = 0, view
            return
        key, pos = _varint(view, 0)
        length, pos = _varint(view, pos)
        if key & 7 != 2 or key >> 3 not in (1, 2) or pos + length != len(view):
            raise ValueError("malformed upload message: expected exactly one header or data field")
        self._field, self._payload = key >> 3, view[pos:]

    def WhichOneof(self, _group: str) -> str | None:  # noqa: N802 - mirrors the protobuf API
        return {1: "header", 2: "data"}.get(self._field)

    @property
    def data(self) -> memoryview:
        return self._payload

    @property
    def header_bytes(self) -> bytes:
        return bytes(self._payload)


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("malformed upload message: bad varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
