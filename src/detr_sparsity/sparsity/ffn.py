"""The one FFN abstraction: each DETR FFN block computes y = fc2(m * relu(fc1 x)) with a per-token mask m
chosen by a policy, and this module is the one place that counts what happened.

Counted per block, over real tokens only (encoder positions that fall on batch padding are excluded, using
the downsampled pixel mask DETR itself uses; decoder queries are all real):
- natural sparsity: post-ReLU values equal to zero, before masking;
- induced sparsity: hidden neurons the policy skips;
- effective sparsity: hidden values that end up zero (skipped or ReLU-zero);
- skipped and added multiply-accumulates, from the masks actually applied (see `policies`).

`sparse_ffns(model, policies)` installs the wrappers and removes them on exit, leaving the model as it was.
With the dense policy a wrapped model computes exactly the same operations as the unwrapped one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.policies import Dense, Policy

# An observer sees each block's post-ReLU activations (before masking), its real-token mask (None: all real)
# and the nonzero count of each token; the activation profile is one.
Observer = Callable[[str, torch.Tensor, torch.Tensor | None, torch.Tensor], None]


def ffn_layers(model: DetrForObjectDetection) -> dict[str, nn.Module]:
    """Every transformer layer holding an FFN block (as `.mlp`), by block name."""
    inner = model.model
    layers = {f"encoder.{i}": layer for i, layer in enumerate(inner.encoder.layers)}
    layers.update({f"decoder.{i}": layer for i, layer in enumerate(inner.decoder.layers)})
    return layers


def ffn_blocks(model: DetrForObjectDetection) -> dict[str, nn.Module]:
    """Every FFN block (DetrMLP: fc1 -> ReLU -> fc2, or its wrapper), named 'encoder.<i>' / 'decoder.<i>'."""
    return {name: layer.mlp for name, layer in ffn_layers(model).items()}


def nonzero_per_token(values: torch.Tensor) -> torch.Tensor:
    """`torch.count_nonzero(values, dim=-1)` of values that are never negative (post-ReLU activations, masked or
    not), as the FFN wrapper counts every block on every batch.

    Equal to it there, NaN and inf included (NaN counts as nonzero): with NaN made 1, sign() is 1 for a nonzero
    value and 0 for a zero, and the float32 sum of a token's signs is exact (far fewer than 2^24 values). On the
    CPU it is about 4x faster on a (16, 64, 1024) block: count_nonzero compares into a boolean tensor and converts
    all of it to int64 before summing. With it a dense evaluation of the default study is 1.11x faster and a
    gate-training step 1.08x (`benchmarks/ffn_counting.py`)."""
    return torch.nan_to_num(values, nan=1.0).sign_().sum(dim=-1, dtype=torch.float32).to(torch.int64)


@dataclass
class BlockCounts:
    """Running totals of one block. They become tensors on the model's device at the first count, so that
    counting never waits for the device; read them with int()."""

    tokens: torch.Tensor | int = 0  # real tokens
    all_tokens: int = 0  # padding included: what a dense FLOP counter sees
    natural_zeros: torch.Tensor | int = 0
    kept: torch.Tensor | int = 0
    effective_zeros: torch.Tensor | int = 0


class SparseFFN(nn.Module):
    """Wraps one DetrMLP; computes fc2(m * relu(fc1 x)) with the policy's mask and counts it."""

    def __init__(self, block: nn.Module, name: str, policy: Policy, counting: bool = True) -> None:
        super().__init__()
        if not isinstance(block.activation_fn, nn.ReLU):
            raise ValueError(f"FFN block {name} uses {type(block.activation_fn).__name__}; the study needs ReLU")
        self.block = block  # the original module, unchanged, so that removing the wrapper restores it
        self.name = name
        self.policy = policy
        self.d_model, self.hidden = block.fc1.in_features, block.fc1.out_features
        self.token_mask: torch.Tensor | None = None  # (batch, tokens) real positions; None: all real
        self.observers: list[Observer] = []
        self.counts = BlockCounts()
        self.counting = counting
        # A new module starts in training mode; take the block's, or dropout would run in an evaluation.
        self.train(block.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        block = self.block
        activations = block.activation_fn(block.fc1(hidden_states))
        keep = self.policy.mask(hidden_states, activations)
        masked = activations if keep is None else activations * keep
        # The same dropout calls as DetrMLP (no-ops in eval), so the dense policy is bit-identical.
        masked = nn.functional.dropout(masked, p=block.activation_dropout, training=self.training)
        output = nn.functional.dropout(block.fc2(masked), p=block.dropout, training=self.training)
        if not self.counting:
            return output
        with torch.no_grad():
            real = self._real_tokens(activations)
            nonzero = nonzero_per_token(activations)
            for observe in self.observers:
                observe(self.name, activations, real, nonzero)
            self._count(activations, keep, masked, real, nonzero)
        return output

    def _real_tokens(self, activations: torch.Tensor) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        real = self.token_mask.to(activations.device, torch.bool)
        if real.shape != activations.shape[:-1]:
            raise RuntimeError(f"{self.name}: token mask {tuple(real.shape)} does not match the block's tokens "
                               f"{tuple(activations.shape[:-1])}")
        return real

    def _count(self, activations, keep, masked, real, nonzero) -> None:
        def over_real_tokens(per_token: torch.Tensor) -> torch.Tensor:
            per_token = torch.broadcast_to(per_token, nonzero.shape)
            return per_token.sum() if real is None else (per_token * real).sum()

        c = self.counts
        c.all_tokens += nonzero.numel()
        tokens = over_real_tokens(torch.ones((), dtype=torch.int64, device=nonzero.device))
        natural_zeros = tokens * self.hidden - over_real_tokens(nonzero)
        if keep is None:
            kept, effective_zeros = tokens * self.hidden, natural_zeros
        else:
            kept = over_real_tokens(keep.sum(dim=-1))
            effective_zeros = tokens * self.hidden - over_real_tokens(nonzero_per_token(masked))
        c.tokens = tokens + c.tokens
        c.natural_zeros = natural_zeros + c.natural_zeros
        c.effective_zeros = effective_zeros + c.effective_zeros
        c.kept = kept + c.kept

    def skipped_macs(self) -> int:
        """Multiply-accumulates the mask saved: fc2's column of a skipped neuron, and fc1's row too unless the
        policy had to compute every activation to choose its mask."""
        c = self.counts
        skipped = int(c.tokens) * self.hidden - int(c.kept)
        return skipped * self.d_model * (1 if self.policy.reads_activations else 2)

    def overhead_macs(self) -> int:
        return int(self.counts.tokens) * self.policy.overhead_macs_per_token(self.d_model, self.hidden)

    def dense_macs(self) -> int:
        """Closed form of the block's dense work on the real tokens: 2 d H per token (fc1 and fc2)."""
        return int(self.counts.tokens) * 2 * self.d_model * self.hidden


class FFNSparsity:
    """The installed wrappers of one model, and the study's measures over everything they ran."""

    def __init__(self, wrappers: dict[str, SparseFFN]) -> None:
        self.blocks = wrappers

    def add_observer(self, observer: Observer) -> None:
        if not all(wrapper.counting for wrapper in self.blocks.values()):
            raise RuntimeError("these FFN wrappers do not count (sparse_ffns(..., counting=False)): "
                               "an observer would never be called")
        for wrapper in self.blocks.values():
            wrapper.observers.append(observer)

    def _fraction(self, names, numerator: Callable[[SparseFFN], int]) -> float | None:
        total = sum(int(self.blocks[n].counts.tokens) * self.blocks[n].hidden for n in names)
        return sum(numerator(self.blocks[n]) for n in names) / total if total else None

    def _measure(self, numerator: Callable[[SparseFFN], int]) -> dict:
        names = sorted(self.blocks, key=block_order)
        return {
            "overall": self._fraction(names, numerator),
            "encoder": self._fraction([n for n in names if n.startswith("encoder")], numerator),
            "decoder": self._fraction([n for n in names if n.startswith("decoder")], numerator),
            "per_block": {n: self._fraction([n], numerator) for n in names},
        }

    def natural_sparsity(self) -> dict:
        """Token-weighted fraction of post-ReLU zeros: overall, encoder, decoder, per block."""
        return self._measure(lambda w: int(w.counts.natural_zeros))

    def induced_sparsity(self) -> dict:
        """Token-weighted fraction of hidden neurons the policies skipped."""
        return self._measure(lambda w: int(w.counts.tokens) * w.hidden - int(w.counts.kept))

    def effective_sparsity(self) -> dict:
        """Token-weighted fraction of hidden values that are zero after masking (skipped or ReLU-zero)."""
        return self._measure(lambda w: int(w.counts.effective_zeros))

    def real_token_fraction(self, name: str) -> float:
        c = self.blocks[name].counts
        return int(c.tokens) / c.all_tokens if c.all_tokens else 1.0


def replace_ffns(model: DetrForObjectDetection, replace: Callable[[str, nn.Module], nn.Module | None]
                 ) -> dict[str, nn.Module]:
    """Put `replace(name, block)` in place of each FFN block (None keeps the block); returns the replacements.

    Every replacement is made before any block changes, so one that refuses (raises) leaves the model as it was.
    The one way FFN blocks are swapped: the evaluation's wrappers, the gated model, the benchmark's variants.
    """
    layers = ffn_layers(model)
    replacements = {}
    for name, layer in layers.items():
        module = replace(name, layer.mlp)
        if module is not None:
            replacements[name] = module
    for name, module in replacements.items():
        layers[name].mlp = module
    return replacements


def _install(model: DetrForObjectDetection, policies: Mapping[str, Policy], counting: bool) -> dict[str, SparseFFN]:
    blocks = ffn_blocks(model)
    unknown = sorted(set(policies) - set(blocks))
    if unknown:
        raise ValueError(f"no FFN block named {', '.join(unknown)}; blocks: {', '.join(blocks)}")

    def wrap(name: str, block: nn.Module) -> SparseFFN:
        if isinstance(block, SparseFFN):
            raise RuntimeError(f"FFN block {name} is already wrapped")
        return SparseFFN(block, name, policies.get(name, Dense()), counting)

    return replace_ffns(model, wrap)


def _remove(model: DetrForObjectDetection) -> None:
    replace_ffns(model, lambda _name, block: block.block if isinstance(block, SparseFFN) else None)


@contextmanager
def sparse_ffns(model: DetrForObjectDetection, policies: Mapping[str, Policy] | None = None, *,
                counting: bool = True) -> Iterator[FFNSparsity]:
    """Wrap every FFN block (a block not named in `policies` runs dense); unwrap on exit.

    `counting=False` runs the same operations without counting or observing anything (the counts stay 0), for
    gate training, which reads only the gates' own logits and the blocks' token masks: a distillation training step
    is 1.04x faster without counting (`benchmarks/gate_training_counting.py`)."""
    wrappers = _install(model, policies or {}, counting)
    encoder = [w for n, w in wrappers.items() if n.startswith("encoder")]

    def remember_token_mask(_module, _inputs, features) -> None:
        # The encoder reads the last feature map, flattened; its mask marks real (not padded) positions.
        _feature_map, mask = features[-1]
        for wrapper in encoder:
            wrapper.token_mask = mask.flatten(1)

    handle = model.model.backbone.register_forward_hook(remember_token_mask)
    try:
        yield FFNSparsity(wrappers)
    finally:
        handle.remove()
        _remove(model)
