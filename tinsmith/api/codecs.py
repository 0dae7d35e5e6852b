"""Wire codecs: protobuf and SDK JSON models <-> Tinsmith's plain data (tinsmith.types).

The SDK ships the schema, so we use it: its compiled protobuf module for
/forward_backward bodies and for ForwardBackwardOutput / SampleResponse results, and its
pydantic models for JSON bodies. Tensors stop at NumPy here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import ModelInput, SamplingParams

from tinsmith.types import DatumIn, FwdBwdOut, SampleOut, SampleSpec, UserError

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


def _chunks_to_tokens(chunks: Sequence[pb.Chunk], where: str) -> np.ndarray:
    parts = []
    for c in chunks:
        which = c.WhichOneof("chunk")
        if which != "encoded_text":
            raise UserError(f"{where}: {which} inputs are not supported by text-only models")
        parts.append(np.frombuffer(c.encoded_text.tokens, dtype=np.int32))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


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
        data.append(DatumIn(tokens=_chunks_to_tokens(d.model_input, where), inputs=inputs))
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins: it also carries strings
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    return FwdBwdRequest(msg.model_id, int(msg.seq_id), data, msg.loss_fn, config, msg.forward_only)


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


def encode_sample(out: SampleOut) -> bytes:
    msg = pb.SampleResponse()
    for s in out.sequences:
        msg.sequences.add(
            stop_reason=_STOP[s.stop_reason],
            tokens=np.asarray(s.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(s.logprobs, dtype=np.float32).tobytes(),
        )
    if out.prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(out.prompt_logprobs, dtype=np.float32).tobytes()
    return msg.SerializeToString()


def model_input_tokens(mi: ModelInput, where: str = "prompt") -> np.ndarray:
    tokens: list[int] = []
    for c in mi.chunks:
        if getattr(c, "type", None) != "encoded_text":
            raise UserError(f"{where}: {getattr(c, 'type', '?')} inputs are not supported by text-only models")
        tokens.extend(c.tokens)
    return np.asarray(tokens, dtype=np.int64)


def sample_spec(
    prompt: ModelInput, num_samples: int, params: SamplingParams, *, eos_token_ids: Sequence[int],
    prompt_logprobs: bool, prompt_logprobs_last_n: int | None,
) -> SampleSpec:
    """`stop` omitted means the model's EOS; `stop=[]` means no stop at all."""
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
    tokens = model_input_tokens(prompt)
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
    )
