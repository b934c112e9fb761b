"""FFN blocks that, within a pretraining step, compute only the hidden units some token of the batch activates.

Under the L1 penalty the stand-in's FFN activations become sparse early in pretraining (97.9 % zeros at its end), and
a hidden unit that is zero for every token of a batch contributes nothing to that step: not to fc2's output, and
not to any gradient (ReLU passes none back where its output is 0, so the unit's fc1 row, its fc1 bias and its fc2
column get exactly zero). `CompactFFN` runs fc1 on every unit, then fc2 and the whole backward pass on the units that
fired for at least one token of the batch (about a third of them late in pretraining, 33-39 % measured, against 2-3 %
per token: a batch holds a thousand tokens). It is the same function and the same gradients as DETR's block; only
the order of floating-point sums differs. Measured in `benchmarks/compact_ffn.py`.

It also returns the block's mean post-ReLU activation (the L1 penalty's term, `pretrain.ActivationL1`) with its
gradient, since fc1's output is no longer a module output a hook could read.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.sparsity.ffn import replace_ffns


class _CompactFFNFunction(torch.autograd.Function):
    """(y, mean) = (fc2(relu(fc1 x)), mean of relu(fc1 x)) on 2-D x, fc2 and the backward on the units that fired;
    `block.fired` is set to their number."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, block):
        hidden = torch.addmm(b1, x, w1.t()).relu_()
        # A unit is dropped only where its column is exactly 0: NaN (== 0 is False) stays, as it would in DETR's block.
        fired = (hidden.amax(dim=0) != 0).nonzero().squeeze(1)
        kept = hidden.index_select(1, fired)
        w2_kept = w2.index_select(1, fired)
        ctx.save_for_backward(x, kept, fired, w1, w2_kept)
        ctx.units = w1.shape[0]
        block.fired = fired.numel()
        return torch.addmm(b2, kept, w2_kept.t()), kept.sum() / hidden.numel()

    @staticmethod
    def backward(ctx, grad_y, grad_mean):
        x, kept, fired, w1, w2_kept = ctx.saved_tensors
        grad_kept = grad_y @ w2_kept + grad_mean / (x.shape[0] * ctx.units)
        grad_pre = grad_kept * (kept > 0)  # ReLU's gradient: 0 where its output is 0, as torch's own
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grad_x = grad_pre @ w1.index_select(0, fired) if need_x else None
        grad_w1 = grad_y.new_zeros(w1.shape).index_copy_(0, fired, grad_pre.t() @ x) if need_w1 else None
        grad_b1 = grad_y.new_zeros(ctx.units).index_copy_(0, fired, grad_pre.sum(0)) if need_b1 else None
        grad_w2 = (grad_y.new_zeros(grad_y.shape[1], ctx.units).index_copy_(1, fired, grad_y.t() @ kept)
                   if need_w2 else None)
        grad_b2 = grad_y.sum(0) if need_b2 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


class CompactFFN(nn.Module):
    """DETR's FFN block (DetrMLP) computed by `_CompactFFNFunction`. Its children are the block's own fc1 and fc2,
    so the model's state dict keeps its keys (a pretraining checkpoint loads into the plain model)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.dropout = block.fc1, block.fc2, block.dropout
        self.original = (block,)  # in a tuple: not a child module, so not in the state dict twice
        self.on_mean: Callable[[torch.Tensor], None] | None = None  # sees each forward's mean activation
        self.fired = 0  # units computed by fc2 in the last forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        y, mean = _CompactFFNFunction.apply(hidden_states.reshape(-1, shape[-1]), self.fc1.weight, self.fc1.bias,
                                            self.fc2.weight, self.fc2.bias, self)
        if self.on_mean is not None:
            self.on_mean(mean)
        y = nn.functional.dropout(y, p=self.dropout, training=self.training)
        return y.reshape(*shape[:-1], y.shape[-1])


def compactable(block: nn.Module) -> bool:
    """A ReLU block without dropout on its hidden activations (DETR's own activation_dropout is 0)."""
    return isinstance(getattr(block, "activation_fn", None), nn.ReLU) and block.activation_dropout == 0


@contextmanager
def compact_ffns(model: DetrForObjectDetection) -> Iterator[dict[str, CompactFFN]]:
    """Compute every compactable FFN block of `model` with `CompactFFN` (the others as they are); restore on exit."""
    def compact(name: str, block: nn.Module) -> CompactFFN | None:
        if isinstance(block, CompactFFN):
            raise RuntimeError(f"FFN block {name} is already compact")
        return CompactFFN(block) if compactable(block) else None

    blocks = replace_ffns(model, compact)
    try:
        yield blocks
    finally:
        replace_ffns(model, lambda _name, block: block.original[0] if isinstance(block, CompactFFN) else None)
