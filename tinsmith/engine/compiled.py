"""Compiled training passes (`--compile-passes`): the decoder layers run through
`torch.compile` in shared-GEMM passes, to fuse the eager layer's many small kernels (norms,
rotary embedding, activation, residuals) where a GPU step is launch-bound.

What is compiled is the decoder layer's own forward, once for all layers of the model
(regional compilation: the layers share one code object, and their weights are graph inputs,
not guards). A pass's adapters must not reach the guards, or every new mix of runs would
recompile: for a compiled pass each adapted layer gets its G groups' factors stacked as two
tensors (`MultiLoraLinear.pass_factors`), and reads no row groups or slots. The guards then
hold only shapes (batch, length, G, rank). The first pass compiles for its exact shapes (a
few seconds); the first change of shape recompiles with those sizes symbolic (torch's
automatic dynamic shapes: much slower to trace, once), and later shapes reuse it. Sizes of
1 are variants of their own. The backward is compiled with the forward (AOTAutograd). In a
training pass the first layer, whose input needs no gradient, runs eagerly (`_forward`).

Used only where it applies: shared passes (not `--exact-packing`) whose groups have equal
row counts, on dense text models; any other pass, and sampling, runs the eager layer. A
compilation error disables compiled passes for the model (logged) and the pass runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from tinsmith.engine.lora import MultiLoraLinear, RowGroup, stacked_factors

log = logging.getLogger("tinsmith.compiled")


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`), if all of one
    class (one compiled forward serves them); else None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    return layers if all(type(layer) is type(layers[0]) for layer in layers) else None


class CompiledPasses:
    """The decoder layers of one model, each dispatching to one shared compiled forward while
    a compiled pass is active (`active`), and to their eager forward otherwise."""

    def __init__(self, layers: nn.ModuleList, backend: str | Callable[..., object] = "inductor") -> None:
        self.layers = layers
        self.targets = [m for layer in layers for m in layer.modules() if isinstance(m, MultiLoraLinear)]
        self.enabled = True
        self._on = False
        self._compiled = torch.compile(type(layers[0]).forward, backend=backend)
        for layer in layers:
            layer.forward = partial(self._forward, layer)  # an instance attribute: nn.Module calls it

    def _forward(self, layer: nn.Module, hidden: torch.Tensor, *args, **kwargs):
        # In a training pass the first layer's input needs no gradient (the embeddings are
        # frozen): compiled, it would be a second variant of everything, traced and guarded
        # apart, doubling compilation time (a 2-core CPU: 90 s of ~180 s at a change of
        # shape) for 1/L of the layers' work. It runs eagerly; under no_grad every layer is
        # compiled (one inference variant).
        if not self._on or (torch.is_grad_enabled() and not hidden.requires_grad):
            return type(layer).forward(layer, hidden, *args, **kwargs)
        return self._compiled(layer, hidden, *args, **kwargs)

    def applies(self, groups: Sequence[RowGroup], separate: bool) -> bool:
        """A shared pass whose groups (at least one) all have the same row count."""
        return self.enabled and not separate and bool(groups) and len({g.rows for g in groups}) == 1

    @contextmanager
    def active(self, groups: Sequence[RowGroup], dtype: torch.dtype) -> Iterator[None]:
        """Within: the decoder layers run compiled, each adapted layer with the groups' factors
        stacked (autograd reaches every adapter's float32 factors through the stack)."""
        for m in self.targets:
            m.pass_factors = _stacked(m, groups, dtype)
        self._on = True
        try:
            # No "duck" sizing while tracing: two sizes equal by chance at the first trace (a
            # pass's length and the head dimension, 64 and 64) would otherwise be guarded
            # equal, and recompile. Set once for the pass, not per layer call.
            with fx_config.patch(use_duck_shape=False):
                yield
        finally:
            self._on = False
            for m in self.targets:
                m.pass_factors = None

    def disable(self, error: BaseException) -> None:
        self.enabled = False
        log.warning("compiled passes disabled after a compilation error; passes run eagerly: %s",
                    f"{type(error).__name__}: {error}"[:2000])


def _stacked(m: MultiLoraLinear, groups: Sequence[RowGroup], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [G, r, in] and B [G, out, r] in `dtype` for the groups' adapters of layer `m`, ranks
    zero-padded to the largest, scales folded into B; a group without this layer (or with
    no adapter) gets zeros. A layer no group adapts gets rank-1 zeros, so that the compiled
    code is the same."""
    weights = m.group_weights(groups)
    if all(w is None for w in weights):
        w0 = m.base.weight
        return (w0.new_zeros((len(groups), 1, m.in_features), dtype=dtype),
                w0.new_zeros((len(groups), m.out_features, 1), dtype=dtype))
    return stacked_factors(weights, m.in_features, m.out_features, dtype, fold_scales=True)


def is_compile_error(e: BaseException) -> bool:
    """An error of torch.compile itself (tracing or code generation), not of the computation."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(e, TorchDynamoException)
