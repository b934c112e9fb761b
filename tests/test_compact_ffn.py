"""Pretraining's compact FFN blocks: DETR's block and its gradients, computed on the hidden units that fire.

Known answers from DETR's own block (transformers' DetrMLP, autograd through it) on inputs where some units never
fire; the number of units computed is recounted from fc1's output."""

from __future__ import annotations

import pytest
import torch
from transformers.models.detr.modeling_detr import DetrConfig, DetrMLP

from detr_sparsity.models.compact_ffn import CompactFFN, compact_ffns
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.sparsity.ffn import ffn_blocks

D, H = 32, 128
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]


def detr_block(dead: int = 40, activation_dropout: float = 0.0) -> DetrMLP:
    """DETR's FFN block whose first `dead` hidden units never fire (bias -100 against inputs of order 1)."""
    torch.manual_seed(0)
    config = DetrConfig(d_model=D, encoder_ffn_dim=H, activation_function="relu", dropout=0.0,
                        activation_dropout=activation_dropout)
    block = DetrMLP(config, D, H)
    with torch.no_grad():
        block.fc1.bias[:dead] = -100.0
    return block


def outputs_and_gradients(block, x: torch.Tensor, mean_of) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """y, the mean activation, and the gradients of sum(y^2) + 0.3 x the mean (an L1 term, as pretraining adds)."""
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    y = block(x)
    mean = mean_of(x)
    ((y ** 2).sum() + 0.3 * mean).backward()
    return y.detach(), mean.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}, x.grad


@pytest.mark.parametrize("shape", [(3, 7, D), (21, D)])
def test_compact_block_is_detrs_block_with_its_gradients(shape):
    block = detr_block()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    want = outputs_and_gradients(block, x, lambda x: torch.relu(block.fc1(x)).mean())
    compact, means = CompactFFN(block), []
    compact.on_mean = means.append
    got = outputs_and_gradients(compact, x, lambda _x: means[-1])

    fired = int((torch.relu(block.fc1(x)) > 0).reshape(-1, H).any(dim=0).sum())
    assert 0 < compact.fired == fired <= H - 40  # the 40 dead units were skipped
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    # Units that never fired get exactly zero gradient, as through DETR's block.
    assert not got[2]["fc1.weight"][:40].any() and not got[2]["fc2.weight"][:, :40].any()


def test_a_nan_activation_reaches_the_output_as_in_detrs_block():
    block = detr_block()
    x = torch.randn(5, D)
    with torch.no_grad():
        block.fc1.weight[0, 0] = float("nan")  # unit 0 (dead by its bias) becomes NaN for every token
        assert block(x).isnan().all()
        assert CompactFFN(block)(x).isnan().all()


def test_compact_ffns_keeps_the_state_dict_and_restores_every_block():
    torch.manual_seed(0)
    model = build_small_detr(small_detr_config(ARCH, CATEGORIES)).eval()
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    keys, plain = list(model.state_dict()), model(pixel_values=pixels).logits
    with compact_ffns(model) as blocks:
        assert sorted(blocks) == sorted(ffn_blocks(model)) and len(blocks) == 4
        assert all(isinstance(block, CompactFFN) for block in ffn_blocks(model).values())
        assert list(model.state_dict()) == keys  # a pretraining checkpoint loads into the plain model
        torch.testing.assert_close(model(pixel_values=pixels).logits, plain, rtol=1e-5, atol=1e-5)
        assert all(0 < block.fired <= H for block in blocks.values())
    assert all(isinstance(block, DetrMLP) for block in ffn_blocks(model).values())
    assert list(model.state_dict()) == keys


def test_a_block_with_activation_dropout_is_left_as_it_is():
    model = build_small_detr(small_detr_config(ARCH, CATEGORIES))
    dropping = ffn_blocks(model)["encoder.0"]
    dropping.activation_dropout = 0.1  # dropout between ReLU and fc2: not the function CompactFFN computes
    with compact_ffns(model) as blocks:
        assert "encoder.0" not in blocks and ffn_blocks(model)["encoder.0"] is dropping
        assert len(blocks) == 3
