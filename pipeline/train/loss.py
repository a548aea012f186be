"""The training objective: per-token next-token cross entropy, with IGNORE marking untrained labels.

Two ways to the same losses. The plain one takes the model's logits. The chunked one takes the
model's final hidden states and projects them through its output embedding a chunk of positions
at a time, each chunk's logits recomputed in backward, so the (batch, seq, vocab) logits and their
fp32 copy are never kept: gpt2-124m at 16 x 1024 tokens saves 1.6 GB of bf16 and 3.3 GB of fp32.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.errors import first_line

IGNORE = -100  # label of a token that is not trained (prompt, padding); torch's and transformers' convention
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Architectures whose logits are exactly output_embedding(hidden_states[-1]), checked by
# tests/test_chunked_loss.py; any other takes the plain path (Gemma 2 softcaps its logits, Cohere scales them).
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"})
LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
AUTO_CHUNK_BYTES = 256 * 2**20  # loss_chunk_tokens=auto: no chunk's fp32 logits are larger
log = logging.getLogger("pipeline")


def token_losses(model, batch: dict, chunk_tokens: int | str = 0) -> torch.Tensor:
    """Per-token cross entropy in fp32 (0 where labels are IGNORE). chunk_tokens: positions per
    chunk of the chunked path, each chunk's logits recomputed in backward; 0: the plain path;
    "auto": chunked only when the fp32 logits of the positions projected would exceed
    AUTO_CHUNK_BYTES (recomputing them costs time where memory is no issue), else one chunk kept."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    labels = batch["labels"]
    head, vocab = _output_head(model, chunk_tokens)
    if head is None:
        logits = model(**inputs, use_cache=False).logits  # no cache: packed position ids then split attention
        return _cross_entropy(logits.flatten(0, 1), labels.flatten()).view_as(labels)
    # Through the model's own forward, so DDP's and PEFT's wrappers see their call. It projects just
    # one position (so the head stays in the outputs' graph, where DDP's find_unused_parameters looks);
    # output_hidden_states=-1 keeps only the last hidden state, which transformers returns after the final norm.
    hidden = model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=-1).hidden_states[-1]
    hidden, flat = hidden.flatten(0, 1), labels.flatten()
    trained = None
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        # Only trained positions meet the head: a chat batch's prompts and padding are 40-60% of it,
        # and the head and its softmax a quarter of a small model's step. A GPU would wait for their
        # count, and a compiled graph recompile for it, so there every position is projected.
        trained = (flat != IGNORE).nonzero().squeeze(1)
        if len(trained) < len(flat):
            hidden, flat = hidden[trained], flat[trained]
        else:  # pretraining: every position is trained, nothing to gather
            trained = None
    chunk = auto_chunk_tokens(len(flat), vocab) if chunk_tokens == "auto" else int(chunk_tokens)
    if not chunk:  # auto, and the logits fit AUTO_CHUNK_BYTES: one chunk, kept, nothing recomputed
        losses = _head_cross_entropy(head, hidden, flat)
    else:
        losses = torch.cat(
            [
                checkpoint(_head_cross_entropy, head, h, y, use_reentrant=False)
                for h, y in zip(hidden.split(chunk), flat.split(chunk))
            ]
        )
    if trained is not None:
        losses = losses.new_zeros(labels.numel()).index_copy(0, trained, losses)
    return losses.view_as(labels)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")


def _head_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Called as a module: a PEFT head (LoRA, trainable tokens, modules_to_save) applies its adapter.
    return _cross_entropy(head(hidden), labels)


def _output_head(model, chunk_tokens: int | str) -> tuple[torch.nn.Module | None, int]:
    """(output embedding, vocabulary size) for the path through the hidden states, or (None, 0) for
    the plain one. The caller passes 0 where parameters live sharded outside the forward (FSDP,
    DeepSpeed)."""
    if not chunk_tokens:
        return None, 0
    inner = unwrapped(model)
    config = inner.config
    if config.model_type not in CHUNKABLE_MODEL_TYPES or any(
        getattr(config, k, None) is not None for k in LOGIT_MODIFIERS
    ):
        return None, 0
    return inner.get_output_embeddings(), config.vocab_size


def unwrapped(model) -> torch.nn.Module:
    """The model inside torch.compile's and DDP's wrappers (sharded launches never project outside
    the forward). accelerate's extract_model_from_parallel would do it, but it imports DeepSpeed
    where installed: seconds, charged to the first measurement that calls it."""
    model = getattr(model, "_orig_mod", model)
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model.module, "_orig_mod", model.module)
    return model


def auto_chunk_tokens(positions: int, vocab: int) -> int:
    """loss_chunk_tokens=auto: positions per chunk whose fp32 logits fit AUTO_CHUNK_BYTES, or 0
    (one chunk, nothing recomputed) where all `positions` fit in one."""
    chunk = max(1, AUTO_CHUNK_BYTES // (4 * vocab))
    return chunk if positions > chunk else 0


class CompiledOrEager:
    """torch.compile a function (train.compile: the model and its loss as one graph; compiling the
    model alone left the loss's casts and softmax eager and gained little). If compiling fails (no
    C++ compiler, an unsupported op), say so once and run it eagerly rather than losing the run."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # inductor/dynamo raise many types
                log.warning(
                    "torch.compile failed (%s: %s); continuing without compilation",
                    type(e).__name__,
                    first_line(e) if str(e).strip() else "",
                )
                self.compiled = None
        return self.fn(*args, **kwargs)


def is_compiled(loss_fn) -> bool:
    """Whether training's loss function runs compiled (a CompiledOrEager whose compile worked)."""
    return isinstance(loss_fn, CompiledOrEager) and loss_fn.compiled is not None
