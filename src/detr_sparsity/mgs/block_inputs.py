"""The dense input x of every FFN block (what fc1 reads), recorded once per gate-training image, so that a gate
objective local to one block can train from it without running DETR.

Only real tokens are kept: encoder positions that fall on batch padding are left out, using the downsampled pixel
mask DETR itself uses (read from the backbone's output, as `sparsity.ffn.sparse_ffns` does); decoder queries are
all real. With `tokens_per_image` > 0, each image keeps a random subset of at most that many of its real tokens in
each block, drawn from `(seed, image, block)` alone: the same images give the same subset whatever the batch
size or device, and each block draws its own positions. Kept tokens stay in each image's row-major order.

Recording is a context manager around the dense pass that builds the front-end cache (stage `mgs_cache`), so the
two caches come from one pass and number the images alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import atomic_path
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import ffn_blocks

_KINDS = ("inputs", "images")


@dataclass
class BlockInputs:
    """Per FFN block: the real tokens' dense inputs (n, d) float32 and the cache index of each token's image (n,)."""

    inputs: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    image_count: int  # images the pass saw, numbered 0 .. image_count - 1 in cache order
    tokens_per_image: int = 0  # the subsample's bound per image and block; 0: every real token
    seed: int = 0
    blocks: list[str] = field(init=False)  # block order: encoder first, each by depth

    def __post_init__(self) -> None:
        if set(self.inputs) != set(self.images):
            raise ValueError(f"inputs of blocks {sorted(self.inputs)} but image indices of {sorted(self.images)}")
        for name in self.inputs:
            x, image = self.inputs[name], self.images[name]
            if x.ndim != 2 or image.shape != x.shape[:1]:
                raise ValueError(f"block {name}: inputs {tuple(x.shape)} and image indices {tuple(image.shape)} "
                                 "must be (n, d) and (n,)")
        self.blocks = sorted(self.inputs, key=block_order)

    def __len__(self) -> int:
        return self.image_count

    def tokens(self) -> dict[str, int]:
        """Tokens recorded per block."""
        return {name: self.inputs[name].shape[0] for name in self.blocks}

    def image_token_counts(self, name: str) -> torch.Tensor:
        """(image_count,) tokens of each image in block `name`."""
        return torch.bincount(self.images[name], minlength=self.image_count)

    def nbytes(self) -> dict[str, int]:
        """Bytes held per block (inputs and image indices)."""
        return {name: self.inputs[name].nbytes + self.images[name].nbytes for name in self.blocks}

    def save(self, path: str | Path) -> None:
        tensors = {f"{kind}/{name}": getattr(self, kind)[name].contiguous() for kind in _KINDS for name in self.blocks}
        metadata = {"image_count": str(self.image_count), "tokens_per_image": str(self.tokens_per_image),
                    "seed": str(self.seed)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "BlockInputs":
        parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            missing = sorted({"image_count", "tokens_per_image", "seed"} - set(metadata))
            if missing:
                raise ValueError(f"{path} is not a block-inputs cache: its metadata lacks {', '.join(missing)}")
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind not in parts or not name:
                    raise ValueError(f"{path}: unexpected tensor {key!r}; a block-inputs cache holds "
                                     "'inputs/<block>' and 'images/<block>'")
                parts[kind][name] = f.get_tensor(key)
        try:
            return cls(inputs=parts["inputs"], images=parts["images"], image_count=int(metadata["image_count"]),
                       tokens_per_image=int(metadata["tokens_per_image"]), seed=int(metadata["seed"]))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _chosen(real: int, bound: int, seed: int, image: int, block: int) -> np.ndarray:
    """Sorted positions, among an image's `real` tokens, of the ones a block keeps (all when `bound` is 0)."""
    if bound == 0 or real <= bound:
        return np.arange(real)
    return np.sort(np.random.default_rng([seed, image, block]).choice(real, size=bound, replace=False))


class BlockInputRecording:
    """What `record_block_inputs` has recorded so far; `block_inputs()` gathers it."""

    def __init__(self, names: list[str], tokens_per_image: int, seed: int) -> None:
        if tokens_per_image < 0:
            raise ValueError(f"tokens_per_image = {tokens_per_image} is not allowed: 0 (every real token) or more")
        self.tokens_per_image, self.seed = tokens_per_image, seed
        self._number = {name: i for i, name in enumerate(sorted(names, key=block_order))}
        self._inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._images: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._images_seen = 0
        self._batch_start = 0
        self._batch_size = 0
        self._real: torch.Tensor | None = None  # (batch, encoder tokens) real positions of the current batch

    def start_batch(self, mask: torch.Tensor) -> None:
        """A forward began (the backbone ran): its images are the next ones; `mask` (B, h, w) marks real positions."""
        self._batch_start, self._batch_size = self._images_seen, mask.shape[0]
        self._images_seen += self._batch_size
        self._real = mask.flatten(1).to("cpu", torch.bool)

    def record(self, name: str, hidden_states: torch.Tensor) -> None:
        batch, length, d = hidden_states.shape
        if self._real is None:
            raise RuntimeError(f"{name}: an FFN block ran before the backbone; record_block_inputs reads the "
                               "encoder's real tokens from the backbone's output (enter it after cached_front_end)")
        if batch != self._batch_size:
            raise RuntimeError(f"{name}: a batch of {batch} in a forward over {self._batch_size} images")
        encoder = name.startswith("encoder")
        if encoder and self._real.shape[1] != length:
            raise RuntimeError(f"{name}: token mask of {self._real.shape[1]} positions for {length} tokens")
        rows, images = [], []
        for b in range(batch):
            positions = self._real[b].nonzero().squeeze(1) if encoder else torch.arange(length)
            image = self._batch_start + b
            keep = _chosen(len(positions), self.tokens_per_image, self.seed, image, self._number[name])
            rows.append(positions[torch.from_numpy(keep)] + b * length)
            images.append(torch.full((len(keep),), image, dtype=torch.int64))
        index = torch.cat(rows).to(hidden_states.device)
        x = hidden_states.detach().reshape(batch * length, d).index_select(0, index)
        self._inputs[name].append(x.to("cpu", torch.float32))
        self._images[name].append(torch.cat(images))

    def block_inputs(self) -> BlockInputs:
        """Everything recorded, as one BlockInputs (the recording's buffers are handed over, not copied twice)."""
        inputs, images = {}, {}
        for name in list(self._inputs):
            # One block at a time, its batches freed once joined: the peak is the cache plus one block.
            parts, self._inputs[name] = self._inputs[name], []
            inputs[name] = torch.cat(parts) if parts else torch.empty(0, 0)
            del parts
            indices, self._images[name] = self._images[name], []
            images[name] = torch.cat(indices) if indices else torch.empty(0, dtype=torch.int64)
        return BlockInputs(inputs=inputs, images=images, image_count=self._images_seen,
                           tokens_per_image=self.tokens_per_image, seed=self.seed)


@contextmanager
def record_block_inputs(model: DetrForObjectDetection, *, tokens_per_image: int = 0, seed: int = 0
                        ) -> Iterator[BlockInputRecording]:
    """Record every FFN block's dense input over the forwards run inside; hooks removed on exit.

    Enter it after anything that replaces the backbone or the FFN blocks (`cached_front_end`, `sparse_ffns`):
    the hooks sit on the modules in place at entry.
    """
    blocks = ffn_blocks(model)
    recording = BlockInputRecording(list(blocks), tokens_per_image, seed)

    def remember_real_tokens(_module, _inputs, features) -> None:
        _feature_map, mask = features[-1]
        recording.start_batch(mask)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            recording.record(name, args[0] if args else kwargs["hidden_states"])
        return record

    handles = [model.model.backbone.register_forward_hook(remember_real_tokens)]
    try:
        for name, block in blocks.items():
            handles.append(block.register_forward_pre_hook(hook(name), with_kwargs=True))
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def build_gate_training_caches(model: DetrForObjectDetection, batches: Iterable[dict], *, tokens_per_image: int = 0,
                               seed: int = 0, total: int | None = None) -> tuple[FrontEndCache, BlockInputs]:
    """Both caches of gate training from one dense pass: the frozen front end and every FFN block's inputs."""
    with record_block_inputs(model, tokens_per_image=tokens_per_image, seed=seed) as recording:
        front_end = build_front_end_cache(model, batches, total)
    return front_end, recording.block_inputs()
