"""The preference objective (DPO and IPO) for `run_training`: each pair's loss from the summed
log-probabilities of its chosen and rejected answers under the policy and the reference.

The reference is the policy's own weights with its LoRA adapter switched off, run without
gradients on the same micro-batch: no second copy of the model.

A batch holds the pairs' sequences as rows (padded) or packed into rows, with `segments` giving
each position's sequence (2k: pair k's chosen answer, 2k+1: its rejected one) and `pair_ids`
(one per pair, the pairs' indices in the data) saying how many pairs it holds. Labels are IGNORE
on the prompt and the padding, so only answer tokens count.

Losses (Rafailov et al. 2023, "Direct Preference Optimization"; Azar et al. 2023, IPO): with
d = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),
  sigmoid: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)   (eps: label_smoothing)
  ipo:     (d' - 1 / (2 beta))^2, d' the same difference of per-token mean log-probabilities;
plus sft_weight x the chosen answer's mean negative log-likelihood per token (RPO: Pang et al. 2024,
"Iterative Reasoning Preference Optimization"; TRL's rpo_alpha), which keeps the chosen answers
likely while the margin grows: without it a small model can widen the margin by making both
answers unlikely.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.train.loss import IGNORE, token_losses, unwrapped

LOSSES = ("sigmoid", "ipo")
METRICS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def sequence_logps(model, batch: dict, chunk_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of each sequence's answer tokens, their counts), both (2 x pairs,)."""
    n = 2 * batch["pair_ids"].shape[0]
    losses = token_losses(model, batch, chunk_tokens).flatten()
    trained = (batch["labels"] != IGNORE).flatten()
    segments = batch["segments"].flatten().clamp(min=0)  # padding: -1, and its loss is 0 and untrained
    logps = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, segments, -losses * trained)
    counts = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, segments, trained.to(losses.dtype))
    return logps, counts


@contextmanager
def reference_of(model):
    """The policy as its reference: its adapter layers passed through, no gradients (called
    through the launch's wrapper, so sharded weights are gathered as for any forward). Only the
    layers' switch is flipped: PEFT's disable_adapter also sets requires_grad off and on again
    between the policy's forward and its backward, which FSDP's and ZeRO's flat parameters must
    not see."""
    inner = unwrapped(model)  # a sharded engine's modules() reach the LoRA layers too
    layers = [m for m in inner.modules() if hasattr(m, "_disable_adapters")]  # LoRA layers, token/module wrappers
    if not layers:
        raise PipelineError("preference tuning trains a LoRA adapter; its reference is the model without it.")
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        with torch.no_grad():
            yield
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


class PreferenceObjective:
    """What a preference step minimises, for run_training: called like a loss function, it returns
    (per-pair losses, per-pair metrics (pairs x len(METRICS)))."""

    metrics = METRICS
    unit, sequences_per_unit = "pairs", 2  # a step's batch counts pairs, of two sequences each

    def __init__(self, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0):
        self.beta, self.loss, self.label_smoothing, self.sft_weight = beta, loss, label_smoothing, sft_weight

    @staticmethod
    def units(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(pairs, input tokens but padding) of a batch: a step's loss is the mean over its pairs."""
        tokens = (batch["segments"] >= 0).sum()
        return torch.stack([torch.full_like(tokens, batch["pair_ids"].shape[0]), tokens])

    def __call__(self, model, batch: dict, chunk_tokens=0) -> tuple[torch.Tensor, torch.Tensor]:
        policy, counts = sequence_logps(model, batch, chunk_tokens)
        with reference_of(model):
            reference, _ = sequence_logps(model, batch, chunk_tokens)
        return self.pair_losses(policy, reference, counts)

    def pair_losses(self, policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor):
        """(losses, metrics) from interleaved (chosen, rejected) sequence log-probabilities."""
        ratios = policy.float() - reference.float()  # log pi - log ref, per sequence
        chosen, rejected = ratios[0::2], ratios[1::2]
        if self.loss == "ipo":
            per_token = ratios / counts.float().clamp(min=1)
            losses = (per_token[0::2] - per_token[1::2] - 1 / (2 * self.beta)) ** 2
        else:
            d = self.beta * (chosen - rejected)
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
        if self.sft_weight:
            losses = losses - self.sft_weight * policy[0::2].float() / counts[0::2].float().clamp(min=1)
        c, r = (self.beta * chosen).detach(), (self.beta * rejected).detach()
        return losses, torch.stack([c, r, c - r, (c > r).float()], dim=1)
