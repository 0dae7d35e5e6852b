"""Wire codecs: protobuf and SDK JSON models <-> Tinsmith's plain data (tinsmith.types).

The SDK ships the schema, so we use it: its compiled protobuf module for
/forward_backward bodies and for ForwardBackwardOutput / SampleResponse results, and its
pydantic models for JSON bodies. Tensors stop at NumPy here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import ModelInput, SamplingParams
from tinker.types._pydantic_types.tensor_data import TensorData as TensorDataModel

from tinsmith.types import (
    IMAGE_SLOT,
    DatumIn,
    FwdBwdOut,
    ImageIn,
    ProvenanceSpan,
    SampleOut,
    SampleSpec,
    UserError,
)

_NP_DTYPE = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_STOP = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


@dataclass(frozen=True)
class FwdBwdRequest:
    model_id: str
    seq_id: int
    data: list[DatumIn]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool


def _tensor(msg: pb.Tensor, where: str) -> np.ndarray:
    """A proto Tensor as a dense array (sparse CSR is expanded; missing cells are 0)."""
    dtype = _NP_DTYPE.get(msg.dtype)
    if dtype is None:
        raise UserError(f"{where}: unsupported tensor dtype {pb.DType.Name(msg.dtype)}")
    shape = tuple(int(s) for s in msg.shape)
    if msg.HasField("sparse_csr"):
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise UserError(f"{where}: malformed sparse CSR tensor for shape {list(shape)}")
        if len(col) and (col.min() < 0 or col.max() >= shape[1]):
            raise UserError(f"{where}: sparse CSR column index out of range for shape {list(shape)}")
        dense = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, col] = values
        return dense
    arr = np.frombuffer(msg.dense, dtype=dtype)
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise UserError(f"{where}: {arr.size} values do not fill shape {list(shape)}")
        arr = arr.reshape(shape)
    # astype copies: frombuffer views are read-only and torch warns about those.
    return arr.astype(np.int64 if dtype != np.float32 else np.float32)


def _image(data: bytes, fmt: str, expected: int | None, at: int, where: str) -> ImageIn:
    """An image chunk at token position `at`; it takes `expected` placeholder positions (what
    the SDK's ModelInput.length counts), 0 when none was given. Decoding is the engine's."""
    if expected is not None and expected < 0:
        raise UserError(f"{where}: image expected_tokens must be >= 0, got {expected}")
    return ImageIn(data=bytes(data), format=str(fmt), at=at, length=expected or 0,
                   expected_tokens=expected)


def _not_supported(kind: str, where: str) -> UserError:
    if kind == "image_asset_pointer":
        return UserError(f"{where}: image_asset_pointer chunks are not supported: this server "
                         "fetches nothing; send the image's bytes as an ImageChunk")
    return UserError(f"{where}: {kind} inputs are not supported by this server")


def _chunks_to_tokens(chunks: Sequence[pb.Chunk], where: str) -> tuple[np.ndarray, tuple[ImageIn, ...]]:
    """Token ids [N] (IMAGE_SLOT where an image sits) and the image chunks, in order."""
    parts: list[np.ndarray] = []
    images: list[ImageIn] = []
    at = 0
    for c in chunks:
        which = c.WhichOneof("chunk")
        if which == "encoded_text":
            parts.append(np.frombuffer(c.encoded_text.tokens, dtype=np.int32))
        elif which == "image":
            im = c.image
            if im.HasField("override_dimensions"):
                raise UserError(f"{where}: image override_dimensions is not supported")
            image = _image(im.data, im.format, im.expected_tokens if im.HasField("expected_tokens")
                           else None, at, where)
            images.append(image)
            parts.append(np.full(image.length, IMAGE_SLOT, dtype=np.int32))
        else:
            raise _not_supported(str(which), where)
        at += len(parts[-1])
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return tokens, tuple(images)


def _span(msg: pb.ProvenanceSpan, where: str) -> ProvenanceSpan:
    which = msg.WhichOneof("span")
    if which is None:
        raise UserError(f"{where}: empty provenance span")
    inner = getattr(msg, which)
    kind = "prompt" if which == "prompt_tokens" else "sampled"
    return ProvenanceSpan(kind, inner.sequence_id, int(inner.offset), int(inner.length))


def decode_forward_backward(body: bytes) -> FwdBwdRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise UserError(f"malformed protobuf ForwardBackwardRequest body: {e}") from e
    if not msg.model_id:
        raise UserError("ForwardBackwardRequest.model_id is missing")
    data = []
    for i, d in enumerate(msg.data):
        where = f"datum {i}"
        inputs = {k: _tensor(t, f"{where}.{k}") for k, t in d.loss_fn_inputs.items()}
        spans = tuple(_span(sp, f"{where}.loss_fn_input_spans") for sp in d.loss_fn_input_spans)
        tokens, images = _chunks_to_tokens(d.model_input, where)
        data.append(DatumIn(tokens=tokens, inputs=inputs, spans=spans, images=images))
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins: it also carries strings
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    return FwdBwdRequest(msg.model_id, int(msg.seq_id), data, msg.loss_fn, config, msg.forward_only)


def seq_address(body: bytes, *, proto: bool) -> tuple[str, int] | None:
    """(model_id, seq_id) of a training-run request body (a protobuf ForwardBackwardRequest,
    or a JSON object), when both can be read from it, else None. Used on rejected requests
    only, so they still consume their seq_id (tinsmith.api.seq_guard)."""
    model_id: object
    seq_id: object
    if proto:
        msg = pb.ForwardBackwardRequest()
        try:
            msg.ParseFromString(body)
        except DecodeError:  # perhaps only the start of one (tinsmith.api.zstd_body)
            return _leading_address(body)
        model_id, seq_id = msg.model_id, int(msg.seq_id)
    else:
        try:
            obj = json.loads(body)
        except ValueError:  # also bytes that are not UTF-8
            return None
        if not isinstance(obj, dict):
            return None
        model_id, seq_id = obj.get("model_id"), obj.get("seq_id")
    if isinstance(model_id, str) and model_id and type(seq_id) is int and seq_id >= 1:
        return model_id, seq_id
    return None


def _leading_address(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) from the first bytes of a ForwardBackwardRequest: the SDK writes
    fields in number order, model_id (1, a string) then seq_id (2, a varint) first."""
    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while at < len(body) and shift < 64:
            b = body[at]
            value |= (b & 0x7F) << shift
            at, shift = at + 1, shift + 7
            if not b & 0x80:
                return value, at
        raise ValueError("truncated varint")

    try:
        tag, at = varint(0)
        if tag != (1 << 3) | 2:
            return None
        n, at = varint(at)
        if at + n > len(body):
            return None
        model_id = body[at : at + n].decode()
        tag, at = varint(at + n)
        if tag != (2 << 3) | 0:
            return None
        seq_id, _ = varint(at)
    except (ValueError, UnicodeDecodeError):
        return None
    seq_id = seq_id - (1 << 64) if seq_id >= 1 << 63 else seq_id  # int32 negatives: 10 bytes
    return (model_id, seq_id) if model_id and seq_id >= 1 else None


def encode_forward_backward(out: FwdBwdOut) -> bytes:
    """One ArrayRecord: per field, all datums' arrays back to back plus byte offsets."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(out.outputs))
    names = out.outputs[0].keys() if out.outputs else ()
    for name in names:
        arrays = [np.ascontiguousarray(o[name], dtype=np.float32) for o in out.outputs]
        sizes = [a.nbytes for a in arrays]
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tobytes()
        bt.dtype = pb.DTYPE_FLOAT32
        if arrays and arrays[0].ndim > 1:
            bt.trailing_shape.extend(arrays[0].shape[1:])
    for k, v in out.metrics.items():
        msg.metrics[k] = float(v)
    return msg.SerializeToString()


def _topk_msg(ids: np.ndarray, logprobs: np.ndarray) -> pb.TopkLogprobs:
    """[n, k] ids and logprobs as the SDK's TopkLogprobs: row-major int32 / float32 bytes."""
    n, k = ids.shape
    return pb.TopkLogprobs(
        token_ids=np.ascontiguousarray(ids, dtype=np.int32).tobytes(),
        logprobs=np.ascontiguousarray(logprobs, dtype=np.float32).tobytes(),
        k=k, length=n,
    )


def _tensor_msg(
    values: np.ndarray, shape: Sequence[int], csr: tuple[np.ndarray, np.ndarray] | None = None
) -> pb.Tensor:
    """A float32 or int64 array as a proto Tensor: dense, or sparse CSR when `csr` =
    (crow [R + 1], col [C]) gives the layout of `values` [C]."""
    dtype = pb.DTYPE_FLOAT32 if values.dtype == np.float32 else pb.DTYPE_INT64
    msg = pb.Tensor(dtype=dtype, shape=[int(s) for s in shape])
    data = np.ascontiguousarray(values).tobytes()
    if csr is None:
        msg.dense = data
    else:
        crow, col = (np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in csr)
        msg.sparse_csr.CopyFrom(pb.SparseCsr(values=data, crow_indices=crow, col_indices=col))
    return msg


def encode_sample(out: SampleOut) -> bytes:
    msg = pb.SampleResponse()
    for s in out.sequences:
        seq = msg.sequences.add(
            stop_reason=_STOP[s.stop_reason],
            tokens=np.asarray(s.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(s.logprobs, dtype=np.float32).tobytes(),
        )
        if s.topk_ids is not None and s.topk_logprobs is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk_msg(s.topk_ids, s.topk_logprobs))
    if out.prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(out.prompt_logprobs, dtype=np.float32).tobytes()
    if out.topk_prompt_ids is not None and out.topk_prompt_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk_msg(out.topk_prompt_ids, out.topk_prompt_logprobs))
    if out.target_logprobs is not None:
        values = np.asarray(out.target_logprobs, dtype=np.float32)
        msg.target_prompt_logprobs.CopyFrom(_tensor_msg(values, out.target_shape, out.target_csr))
    if out.alt_tokens is not None and out.alt_logprobs is not None:
        tokens = np.asarray(out.alt_tokens, dtype=np.int64)
        msg.prompt_alt_tokens.tokens.CopyFrom(_tensor_msg(tokens, tokens.shape))
        logprobs = np.asarray(out.alt_logprobs, dtype=np.float32)
        msg.prompt_alt_tokens.logprobs.CopyFrom(_tensor_msg(logprobs, logprobs.shape))
    return msg.SerializeToString()


def model_input_tokens(mi: ModelInput, where: str = "prompt") -> tuple[np.ndarray, tuple[ImageIn, ...]]:
    """A JSON ModelInput as token ids [P] (IMAGE_SLOT where an image sits) and its images."""
    tokens: list[int] = []
    images: list[ImageIn] = []
    for c in mi.chunks:
        kind = getattr(c, "type", None)
        if kind == "encoded_text":
            tokens.extend(c.tokens)
        elif kind == "image":
            image = _image(c.data, c.format, c.expected_tokens, len(tokens), where)
            images.append(image)
            tokens.extend([IMAGE_SLOT] * image.length)
        else:
            raise _not_supported(str(kind), where)
    return np.asarray(tokens, dtype=np.int64), tuple(images)


def _int64s(values: Sequence[int] | Sequence[float], where: str) -> np.ndarray:
    """JSON numbers that must be integers, as int64 [n]."""
    if not all(isinstance(v, int) or float(v).is_integer() for v in values):
        raise UserError(f"{where} must hold integers")
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64).reshape(-1)
    except OverflowError as e:
        raise UserError(f"{where} holds a value outside the int64 range") from e


_Csr = tuple[np.ndarray, np.ndarray]  # (crow int64 [R + 1], col int64 [C])


def decode_target(td: TensorDataModel | None) -> tuple[np.ndarray | None, tuple[int, ...], _Csr | None]:
    """SampleSpec's (target_ids, target_shape, target_csr) for the request's
    `target_prompt_logprobs`, a JSON TensorData, dense or sparse CSR, kept in its layout.
    Its shape, layout and ids are checked by check_sample."""
    if td is None:
        return None, (), None
    where = "target_prompt_logprobs"
    if td.dtype != "int64":
        raise UserError(f"{where} must be an int64 tensor of token ids, got {td.dtype}")
    ids = _int64s(td.data, where)
    shape = tuple(int(s) for s in td.shape) if td.shape is not None else (ids.size,)
    if (td.sparse_crow_indices is None) != (td.sparse_col_indices is None):
        raise UserError(f"{where}: sparse_crow_indices and sparse_col_indices go together")
    csr = None
    if td.sparse_crow_indices is not None and td.sparse_col_indices is not None:
        csr = (_int64s(td.sparse_crow_indices, f"{where}.sparse_crow_indices"),
               _int64s(td.sparse_col_indices, f"{where}.sparse_col_indices"))
    return ids, shape, csr


def sample_spec(
    prompt: ModelInput, num_samples: int, params: SamplingParams, *, eos_token_ids: Sequence[int],
    prompt_logprobs: bool, prompt_logprobs_last_n: int | None, topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0, target_prompt_logprobs: TensorDataModel | None = None,
    prompt_alt_tokens_k: int = 0,
) -> SampleSpec:
    """`stop` omitted means the model's EOS; `stop=[]` means no stop at all. Limits of the
    per-position extras (top-k widths, target ids) are checked by check_sample."""
    stop = params.stop
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    if stop is None:
        stop_tokens = tuple(eos_token_ids)
    elif isinstance(stop, str):
        stop_strings = (stop,)
    elif all(isinstance(s, int) for s in stop):
        stop_tokens = tuple(int(s) for s in stop)  # type: ignore[arg-type]
    elif all(isinstance(s, str) for s in stop):
        stop_strings = tuple(str(s) for s in stop)
    else:
        raise UserError("sampling_params.stop must be a string, a list of strings or a list of token ids")
    tokens, images = model_input_tokens(prompt)
    target_ids, target_shape, target_csr = decode_target(target_prompt_logprobs)
    if prompt_logprobs_last_n is not None and not 1 <= prompt_logprobs_last_n <= max(len(tokens) - 1, 1):
        raise UserError(
            f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {len(tokens) - 1}"
        )
    return SampleSpec(
        prompt=tokens,
        num_samples=num_samples,
        max_tokens=params.max_tokens if params.max_tokens is not None else 16,
        temperature=float(params.temperature),
        top_k=int(params.top_k),
        top_p=float(params.top_p),
        seed=params.seed,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        prompt_logprobs=prompt_logprobs,
        prompt_logprobs_last_n=prompt_logprobs_last_n,
        topk_prompt_logprobs=int(topk_prompt_logprobs),
        topk_sample_logprobs=int(topk_sample_logprobs),
        prompt_alt_tokens_k=int(prompt_alt_tokens_k),
        target_ids=target_ids,
        target_shape=target_shape,
        target_csr=target_csr,
        images=images,
    )
