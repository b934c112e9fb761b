"""Training the MGS gates of a frozen DETR toward an induced-sparsity target.

loss = objective + lambda x (open - budget), with open the mean gate probability over real tokens and gated
blocks and budget the allowed open fraction. lambda is a Lagrange multiplier updated by dual ascent on the
constraint measured with the hard mask: it rises while more groups are open than the budget allows and falls
(never below zero) once fewer are. A fixed penalty stalls short of high targets (measured: 72 % for a 90 %
target); the multiplier keeps pushing until the constraint holds, then lets the objective recover accuracy.

The budget starts at 1 (every gate open, as initialised) and falls linearly to 1 - target over the first
`target_warmup` of the steps. Asked for the full target at once, the multiplier grows for as long as the gates
take to respond and then overshoots: measured, every gate closed within 200 steps and never reopened.

Only the gates have trainable parameters; the dense model's weights are frozen and never change. Training
reads the cached front end, and saves a checkpoint every `checkpoint_every` steps from which an interrupted
run resumes exactly (batches are drawn from per-epoch seeded permutations, as in pretraining). The training
curve (the step metrics at about 400 evenly spaced steps) is kept in the checkpoint too, so a resumed run
returns the same curve as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import atomic_path
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.mgs.objectives import check_objective, needs_labels, objective_loss
from detr_sparsity.models.front_end import cached_front_end
from detr_sparsity.sparsity.ffn import FFNSparsity, sparse_ffns

log = logging.getLogger(__name__)

StepLogger = Callable[[int, dict[str, float]], None]
CURVE_POINTS = 400  # steps of the training curve kept in training.json (every step goes to MLflow)


@dataclass(frozen=True)
class GateTraining:
    target: float
    objective: str = "task"
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-2
    multiplier_rate: float = 0.05  # dual-ascent step of lambda, per unit of constraint violation
    target_warmup: float = 0.3  # fraction of the steps over which the budget falls from 1 to 1 - target
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target = {self.target} is not allowed: must be strictly between 0 and 1")
        check_objective(self.objective)
        if not 0.0 <= self.target_warmup <= 1.0:
            raise ValueError(f"target_warmup = {self.target_warmup} is not allowed: must be in [0, 1]")

    @classmethod
    def from_budget(cls, budget: Mapping[str, object], target: float, objective: str, **overrides) -> GateTraining:
        """The training of params.yaml's gate-training budget (`studies.<study>.mgs.training`), toward `target` with
        `objective`; `overrides` replace budget entries. The budget's `warm_start` chooses the gates training starts
        from, not how they train, so it is left to the caller."""
        return cls(target=target, objective=objective,
                   **{**{k: v for k, v in budget.items() if k != "warm_start"}, **overrides})

    def budget(self, step: int) -> float:
        """The open fraction allowed at `step` (0-based): 1 - target once the warm-up is over."""
        ramp = min(1.0, step / (self.target_warmup * self.steps)) if self.target_warmup > 0 else 1.0
        return 1.0 - self.target * ramp


def open_fractions(sparsity: FFNSparsity, gates: Mapping[str, MicroGate]
                   ) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Open-gate fractions of the last forward pass over real tokens, token-weighted: soft (mean p, for the
    gradient) and hard (the mask applied) over every gated block, and hard per block."""
    soft, hard, count, per_block = 0.0, 0.0, 0.0, {}
    for name, gate in gates.items():
        logits, real = gate.last_logits, sparsity.blocks[name].token_mask
        weight = (torch.ones(logits.shape[:-1], device=logits.device) if real is None
                  else real.to(logits.dtype))[..., None]
        slots = float(weight.sum()) * gate.groups
        opened = float((gate.open_groups(logits) * weight).sum())
        soft = soft + (torch.sigmoid(logits) * weight).sum()
        hard += opened
        count += slots
        per_block[name] = opened / slots
    return soft / count, hard / count, per_block


def _batches(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The batch of `step`: epoch-seeded permutations, so a resumed run draws what an uninterrupted one would."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


def train_gates(model: DetrForObjectDetection, gates: dict[str, MicroGate], cache: FrontEndCache,
                settings: GateTraining, seed: int, checkpoint: Path | None = None,
                log_step: StepLogger | None = None) -> dict[str, float]:
    """Train `gates` in place on the cached front end (or any source with the same `len()` and `batch(index)`);
    returns the last step's metrics, the training time and the training curve (`curve`: step metrics)."""
    images = len(cache)
    if images < settings.batch_size:
        raise ValueError(f"batch_size {settings.batch_size} is larger than the {images} cached images")
    model.eval()  # frozen: no dropout, batch norm statistics fixed
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for gate in gates.values() for p in gate.parameters()]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    multiplier, step, elapsed = 0.0, 0, 0.0
    curve: list[dict[str, float]] = []
    curve_every = max(1, settings.steps // CURVE_POINTS)
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=model.device)
        for name, gate in gates.items():
            gate.load_state_dict(state["gates"][name])
        optimizer.load_state_dict(state["optimizer"])
        multiplier, step, elapsed = state["multiplier"], state["step"], state["elapsed"]
        curve = state["curve"]
        log.info("resuming gate training from %s at step %d", checkpoint, step)
    box_weight = float(model.config.bbox_loss_coefficient)
    metrics: dict[str, float] = {}
    start = time.perf_counter() - elapsed
    progress = tqdm(total=settings.steps, initial=step, desc=f"gates {settings.target}", mininterval=10)
    # Nothing here reads the wrappers' counts (the constraint is measured on the gates themselves): not counted.
    with cached_front_end(model) as front, sparse_ffns(model, gates, counting=False) as sparsity:
        # After wrapping: a wrapper takes its frozen block's eval mode, and with it its gate's.
        for gate in gates.values():
            gate.train()
            gate.keep_activations = settings.objective == "oracle"
        while step < settings.steps:
            batch = cache.batch(_batches(images, settings.batch_size, seed, step), model.device)
            outputs = model(**front.inputs(batch["features"], batch["mask"]),
                            labels=batch["labels"] if needs_labels(settings.objective) else None)
            objective_term = objective_loss(settings.objective, outputs, batch, gates, sparsity, settings.target, box_weight)
            soft, hard, per_block = open_fractions(sparsity, gates)
            budget = settings.budget(step)
            loss = objective_term + multiplier * (soft - budget)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            multiplier = max(0.0, multiplier + settings.multiplier_rate * (hard - budget))
            step += 1
            metrics = {"loss": float(loss.detach()), "objective_loss": float(objective_term.detach()),
                       "induced_sparsity": 1.0 - hard, "multiplier": multiplier, "budget": budget,
                       **{f"induced_sparsity.{name}": 1.0 - value for name, value in per_block.items()}}
            if log_step is not None:
                log_step(step, metrics)
            if step % curve_every == 0 or step == settings.steps:
                curve.append({"step": step, **metrics})
            progress.update(1)
            if step % 100 == 0:
                log.info("step %d/%d: %s loss %.4f, sparsity %.3f (target %.2f), lambda %.3f", step, settings.steps,
                         settings.objective, metrics["objective_loss"], metrics["induced_sparsity"],
                         settings.target, multiplier)
            if checkpoint is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
                _save_checkpoint(checkpoint, gates, optimizer, multiplier, step, time.perf_counter() - start, curve)
    progress.close()
    for gate in gates.values():
        gate.eval()
        gate.keep_activations, gate.last_logits, gate.last_activations = False, None, None
    return {**metrics, "steps": step, "train_seconds": time.perf_counter() - start, "curve": curve}


def _save_checkpoint(path: Path, gates, optimizer, multiplier: float, step: int, elapsed: float,
                     curve: list[dict[str, float]]) -> None:
    state = {"gates": {name: gate.state_dict() for name, gate in gates.items()}, "optimizer": optimizer.state_dict(),
             "multiplier": multiplier, "step": step, "elapsed": elapsed, "curve": curve}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
