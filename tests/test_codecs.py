"""Wire codecs against the SDK's own encoders and decoders (its protobuf module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from tinsmith.api.codecs import decode_forward_backward, encode_forward_backward, encode_sample
from tinsmith.types import FwdBwdOut, SampledSeq, SampleOut, UserError


def test_forward_backward_request_dense_and_sparse() -> None:
    targets_2d = torch.tensor([[5, 0], [0, 7], [8, 9]])  # 2-D torch -> sent as sparse CSR
    weights_2d = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.25, 0.75]])
    data = [
        types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, -2.0, 0.5]}),
        types.Datum(model_input=types.ModelInput.from_ints([4, 5, 6]),
                    loss_fn_inputs={"target_tokens": targets_2d, "weights": weights_2d}),
    ]
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn="cross_entropy", loss_fn_config={"beta": 0.5, "loss_id": "x"}),
        model_id="s:train:0", seq_id=7)
    body = forward_backward_request_to_proto(req).SerializeToString()
    fb = decode_forward_backward(body)
    assert (fb.model_id, fb.seq_id, fb.loss_fn, fb.forward_only) == ("s:train:0", 7, "cross_entropy", False)
    assert fb.loss_fn_config == {"beta": 0.5, "loss_id": "x"}
    np.testing.assert_array_equal(fb.data[0].tokens, [1, 2, 3])
    np.testing.assert_array_equal(fb.data[0].inputs["weights"], np.float32([1.0, -2.0, 0.5]))
    np.testing.assert_array_equal(fb.data[1].inputs["target_tokens"], targets_2d.numpy())
    np.testing.assert_array_equal(fb.data[1].inputs["weights"], weights_2d.numpy())
    assert fb.data[1].inputs["target_tokens"].dtype == np.int64


def test_malformed_body_is_a_user_error() -> None:
    with pytest.raises(UserError, match="malformed protobuf"):
        decode_forward_backward(b"\x0a\xff\xff\xff")


def test_forward_backward_output_roundtrip() -> None:
    out = FwdBwdOut(outputs=[{"logprobs": np.float32([-1, -2, -3])}, {"logprobs": np.float32([-4])}],
                    metrics={"loss:sum": 10.0})
    got = deserialize_forward_backward_output(encode_forward_backward(out))
    assert got.metrics == {"loss:sum": 10.0}
    assert [o["logprobs"].tolist() for o in got.loss_fn_outputs] == [[-1, -2, -3], [-4]]
    out2 = FwdBwdOut(outputs=[{"logprobs": np.float32([[-1, -2], [-3, -4]])}], metrics={})
    got2 = deserialize_forward_backward_output(encode_forward_backward(out2))
    assert got2.loss_fn_outputs[0]["logprobs"].shape == [2, 2]


def test_sample_response_roundtrip() -> None:
    out = SampleOut(
        sequences=[SampledSeq(np.int32([3, 4, 2]), np.float32([-0.5, -1.0, -0.1]), "stop"),
                   SampledSeq(np.int32([9]), np.float32([-2.0]), "length")],
        prompt_logprobs=np.float32([np.nan, -1.5]),
    )
    got = deserialize_sample_response(encode_sample(out))
    assert [s.tokens for s in got.sequences] == [[3, 4, 2], [9]]
    assert [s.stop_reason for s in got.sequences] == ["stop", "length"]
    assert got.sequences[0].logprobs == pytest.approx([-0.5, -1.0, -0.1])
    assert got.prompt_logprobs == [None, -1.5]
