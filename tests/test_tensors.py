import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.models import ModelSpec, build_model, mlp_for_params, num_parameters
from common.pb import tensor_pb2
from common.tensors import (
    ChunkAssembler,
    Manifest,
    flatten_state_dict,
    from_wire,
    iter_chunks,
    load_flat_into_module,
    to_wire,
    unflatten_to_state_dict,
)


def test_state_dict_roundtrip_through_wire_bytes_and_manifest_proto() -> None:
    model = build_model(ModelSpec("mlp", {"hidden": [32, 16]}), seed=3)
    state = model.state_dict()
    manifest = Manifest.from_proto(Manifest.from_state_dict(state).to_proto())
    data = to_wire(flatten_state_dict(state))
    assert len(data) == manifest.total_bytes
    restored = unflatten_to_state_dict(from_wire(data), manifest)
    assert list(restored) == list(state)
    for name in state:
        assert torch.equal(restored[name], state[name])


def test_wire_format_is_little_endian_float32() -> None:
    assert to_wire(np.array([1.0], dtype=np.float32)) == b"\x00\x00\x80\x3f"


def test_manifest_with_wrong_total_or_dtype_is_refused() -> None:
    msg = tensor_pb2.Manifest(
        tensors=[tensor_pb2.TensorSpec(name="w", shape=[2, 3], dtype=tensor_pb2.DTYPE_FLOAT32)],
        total_elements=7,
    )
    with pytest.raises(ValueError, match="total_elements"):
        Manifest.from_proto(msg)
    msg.total_elements = 6
    msg.tensors[0].dtype = tensor_pb2.DTYPE_UNSPECIFIED
    with pytest.raises(ValueError, match="FLOAT32"):
        Manifest.from_proto(msg)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False), min_size=0, max_size=300),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_chunked_stream_reassembles_exactly(values: list[float], chunk: int) -> None:
    vector = np.array(values, dtype=np.float32)
    data = to_wire(vector)
    assembler = ChunkAssembler(len(data))
    for piece in iter_chunks(data, chunk):
        assembler.add(piece)
    np.testing.assert_array_equal(assembler.finish(), vector)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False), min_size=0, max_size=300),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_kept_chunks_give_the_stream_as_consecutive_parts(values: list[float], chunk: int) -> None:
    vector = np.array(values, dtype=np.float32)
    data = to_wire(vector)
    buffer = np.full(len(vector), 7.0, dtype=np.float32)
    assembler = ChunkAssembler(len(data), buffer, keep_chunks=True)
    for piece in iter_chunks(data, chunk):
        assembler.add(memoryview(piece))
    parts = assembler.finish_parts()
    whole = np.concatenate(parts) if parts else np.empty(0, np.float32)
    np.testing.assert_array_equal(whole, vector)
    if chunk % 4 == 0:  # whole values per chunk: the chunks themselves, not copied
        np.testing.assert_array_equal(buffer, np.full(len(vector), 7.0, dtype=np.float32))
    assert all(not p.flags.writeable for p in parts) or chunk % 4


def test_kept_chunks_are_copied_when_their_sender_could_change_them() -> None:
    source = bytearray(np.arange(4, dtype=np.float32).tobytes())
    assembler = ChunkAssembler(16, keep_chunks=True)
    assembler.add(memoryview(source))
    source[:4] = b"\xff" * 4  # the sender's buffer changes after the add
    np.testing.assert_array_equal(assembler.finish_parts()[0], np.arange(4, dtype=np.float32))
    short = ChunkAssembler(16, keep_chunks=True)
    short.add(b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated"):
        short.finish_parts()


def test_assembler_refuses_overflow_and_truncation() -> None:
    assembler = ChunkAssembler(8)
    assembler.add(b"\x00" * 4)
    with pytest.raises(ValueError, match="exceeds its declared size"):
        assembler.add(b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated"):
        assembler.finish()


def test_load_flat_into_module_sets_weights() -> None:
    model = build_model(ModelSpec(), seed=0)
    vector = np.arange(num_parameters(model), dtype=np.float32)
    load_flat_into_module(model, vector)
    np.testing.assert_array_equal(flatten_state_dict(model.state_dict()), vector)


@pytest.mark.parametrize("target", [10_000, 1_000_000, 13_000_000])
def test_mlp_for_params_is_within_one_percent(target: int) -> None:
    spec = mlp_for_params(target)
    hidden = spec.config["hidden"][0]
    params = 64 * hidden + hidden + hidden * 10 + 10
    assert abs(params - target) / target < 0.01


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000), header=st.booleans())
def test_framed_chunk_reads_what_protobuf_writes(data: bytes, header: bool) -> None:
    from common.pb import federation_pb2 as pb
    from common.tensors import FramedChunk

    if header:
        msg = pb.MaskedChunk(header=pb.MaskedHeader(round_id="r", total_elements=len(data)))
        framed = FramedChunk(msg.SerializeToString())
        assert framed.WhichOneof("part") == "header"
        assert pb.MaskedHeader.FromString(framed.header_bytes) == msg.header
    else:
        framed = FramedChunk(pb.MaskedChunk(data=data).SerializeToString())
        assert framed.WhichOneof("part") == "data" and bytes(framed.data) == data


def test_framed_chunk_refuses_anything_else() -> None:
    from common.tensors import FramedChunk

    assert FramedChunk(b"").WhichOneof("part") is None
    for bad in (b"\x1a\x01x", b"\x12\x05ab", b"\x12\x01a\x12\x01b", b"\x10\x01", b"\xff"):
        with pytest.raises(ValueError):
            FramedChunk(bad)
