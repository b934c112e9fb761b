"""Streaming statistics of the FFN activations of the dense model over the calibration split.

Nothing per token is kept: per block, running per-neuron firing counts and activation sums, and one zero
count per image. From them:
- per-layer natural sparsity, token-weighted (counted by the FFN wrappers) and its spread across images;
- per-neuron firing frequency P[relu(fc1 x)_n > 0] and mean activation E[relu(fc1 x)_n] (SIBS's indicators);
- the per-image sparsity distribution of every block.
Padding tokens are excluded everywhere (the wrappers pass each block's real-token mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import sparse_ffns

INDICATORS = ("firing_frequency", "mean_activation")
QUANTILES = {"p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}


class ActivationProfile:
    """An observer of the FFN wrappers that accumulates per-neuron and per-image statistics."""

    def __init__(self) -> None:
        self.firing: dict[str, torch.Tensor] = {}
        self.activation_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor | int] = {}  # real tokens seen, per block
        self.image_zeros: dict[str, list[torch.Tensor]] = {}
        self.image_tokens: dict[str, list[torch.Tensor]] = {}

    def __call__(self, name: str, activations: torch.Tensor, real: torch.Tensor | None,
                 nonzero: torch.Tensor) -> None:
        # activations: (images, tokens, H) post-ReLU; real: (images, tokens) or None; nonzero: (images, tokens).
        hidden = activations.shape[-1]
        if real is None:
            real = torch.ones(nonzero.shape, dtype=torch.bool, device=nonzero.device)
        flat = activations.reshape(-1, hidden)
        weight = real.reshape(1, -1).to(activations.dtype)
        # Column sums as matrix-vector products over real tokens; activations >= 0, so sign() is 1[fired].
        # Float32 is exact for these integer counts (fewer than 2^24 tokens per batch).
        fired = (weight @ torch.sign(flat)).flatten()
        summed = (weight @ flat).flatten()
        image_tokens = real.sum(dim=1)
        if name not in self.firing:
            self.firing[name] = torch.zeros(hidden, dtype=torch.int64, device=activations.device)
            self.activation_sum[name] = torch.zeros(hidden, dtype=torch.float64, device=activations.device)
            self.tokens[name], self.image_zeros[name], self.image_tokens[name] = 0, [], []
        self.firing[name] += fired.round().to(torch.int64)
        self.activation_sum[name] += summed.double()
        self.tokens[name] = image_tokens.sum() + self.tokens[name]
        self.image_zeros[name].append(image_tokens * hidden - (nonzero * real).sum(dim=1))
        self.image_tokens[name].append(image_tokens)

    def neurons(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per block, each indicator per neuron: firing_frequency and mean_activation (float32, on CPU)."""
        return {name: {"firing_frequency": (self.firing[name].double() / int(self.tokens[name])).float().cpu(),
                       "mean_activation": (self.activation_sum[name] / int(self.tokens[name])).float().cpu()}
                for name in self.firing}

    def per_image_sparsity(self) -> dict[str, np.ndarray]:
        """Per block, the natural sparsity of each image (over that image's real tokens)."""
        hidden = {name: self.firing[name].numel() for name in self.firing}
        return {name: (torch.cat(self.image_zeros[name]).double()
                       / (torch.cat(self.image_tokens[name]).double() * hidden[name])).cpu().numpy()
                for name in self.firing}


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            **{key: float(np.quantile(values, q)) for key, q in QUANTILES.items()}, "max": float(values.max())}


@torch.no_grad()
def profile_activations(model, loader, total: int | None = None) -> tuple[dict, ActivationProfile]:
    """Run the dense model over `loader` with the profile attached; returns (natural sparsity, profile)."""
    profile = ActivationProfile()
    with sparse_ffns(model) as sparsity:
        sparsity.add_observer(profile)
        for batch in tqdm(loader, total=total, desc="profile", mininterval=10):
            model(pixel_values=batch["pixel_values"].to(model.device), pixel_mask=batch["pixel_mask"].to(model.device))
        natural = sparsity.natural_sparsity()
    return natural, profile


def profile_summary(split: str, images: int, natural: dict, profile: ActivationProfile
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """profile.json's content (per-block and per-image sparsity, firing-frequency spread), and the per-neuron
    indicators as the tensors of neurons.safetensors (`<block>.<indicator>`)."""
    neurons = profile.neurons()
    per_image = profile.per_image_sparsity()
    names = sorted(neurons, key=block_order)
    summary = {
        "split": split,
        "images": images,
        "natural_sparsity": natural,
        "per_block": {
            name: {
                "tokens": int(profile.tokens[name]),
                "natural_sparsity": natural["per_block"][name],
                "per_image": _spread(per_image[name]),
                "firing_frequency": _spread(neurons[name]["firing_frequency"].double().numpy()),
                "never_firing_neurons": int((profile.firing[name] == 0).sum()),
            }
            for name in names
        },
        "per_image_sparsity": {name: per_image[name].round(6).tolist() for name in names},
    }
    tensors = {f"{name}.{key}": value.contiguous() for name in names for key, value in neurons[name].items()}
    return summary, tensors


def load_indicator(neurons: Path, indicator: str) -> dict[str, torch.Tensor]:
    """Per block, one indicator value per neuron, from the profile's neurons.safetensors."""
    if indicator not in INDICATORS:
        raise ValueError(f"indicator {indicator!r} is not known; allowed: {', '.join(INDICATORS)}")
    tensors = load_file(str(neurons))
    suffix = f".{indicator}"
    return {key[: -len(suffix)]: value for key, value in tensors.items() if key.endswith(suffix)}
