"""Preference pairs: read them (the formats TRL documents), render them through the chat template
as generation will see them, and batch them for the preference objective (train/preference.py).

A record is `prompt` + `chosen` + `rejected`: strings (the prompt one user turn), or message lists
(the prompt any turns, each answer one assistant message), or, without `prompt`, `chosen` and
`rejected` as whole conversations whose shared beginning is the prompt. Both answers follow the
same prompt tokens, the tokens of the template's generation prompt; only the answer's tokens,
through its end-of-turn token, are scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.chat import Example, TemplateMismatch, _answer_end, _labelled, _text, _turn_span
from pipeline.data.conversations import check_messages
from pipeline.data.jsonl import read_jsonl
from pipeline.data.order import EpochShuffle
from pipeline.data.sources import is_val, resolve_paths, stream_hf_dataset
from pipeline.errors import PipelineError
from pipeline.train.loss import IGNORE

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]  # the messages before the answer
    chosen: str
    rejected: str


@dataclass
class RenderedPair:
    chosen: Example  # shifted (labels are next tokens), the prompt's labels IGNORE
    rejected: Example
    prompt_tokens: int


def _answer(value, key: str) -> tuple[list[dict], str]:
    """(messages before the answer, the answer's text) of a `chosen`/`rejected` value."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{key!r} is empty")
        return [], value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a string or a list of messages")
    if not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
        raise ValueError(f"the last message of {key!r} must be the assistant's answer")
    messages = check_messages(value)
    return messages[:-1], messages[-1]["content"]


def to_pair(row) -> Pair:
    """A pair from one record, or ValueError saying what is wrong with it."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"a pair needs 'chosen' and 'rejected' (and usually 'prompt'); found {found}")
    before_c, chosen = _answer(row["chosen"], "chosen")
    before_r, rejected = _answer(row["rejected"], "rejected")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: the conversations' shared turns
        if not before_c or before_c != before_r:
            raise ValueError(
                "without 'prompt', 'chosen' and 'rejected' must be conversations with the same turns before the answer"
            )
        return Pair(before_c, chosen, rejected)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt if isinstance(m, dict)]
        if len(messages) != len(prompt) or any(
            m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str) for m in messages
        ):
            raise ValueError("'prompt' messages must be {'role': system|user|assistant, 'content': a string}")
    else:
        raise ValueError("'prompt' must be a string or a list of messages")
    if before_c != before_r:
        raise ValueError("'chosen' and 'rejected' hold different turns before their answers")
    return Pair(messages + before_c, chosen, rejected)


def read_pairs(spec, counts: dict) -> Iterator[Pair]:
    """Pairs from preference.data: JSONL files or a hub dataset; a bad record is an error naming
    file and line (or dataset row), or with skip_bad counted in counts["bad"]."""
    fix = "fix the line or set preference.data.skip_bad=true to skip such lines"
    if spec.source == "hf":
        for i, row in enumerate(stream_hf_dataset(spec.name, spec.config, spec.split, "preference.data.name")):
            try:
                yield to_pair(row)
            except ValueError as e:
                if not spec.skip_bad:
                    raise PipelineError(f"dataset {spec.name!r} row {i}: {e}; {fix}.") from None
                counts["bad"] = counts.get("bad", 0) + 1
        return
    for path in resolve_paths(spec.paths, "**/*.jsonl", "JSONL preference pairs", "preference.data.paths"):
        yield from read_jsonl(Path(path), to_pair, fix, spec.skip_bad, counts)


def split_pairs(pairs: Iterator[Pair], val_fraction: float, max_val: int, where: str) -> tuple[list, list]:
    """(train, val): a deterministic split by a hash of each pair's prompt."""
    train, val = [], []
    for pair in pairs:  # by prompt: the pairs of one prompt stay on one side
        key = json.dumps(pair.prompt, sort_keys=True)
        (val if is_val(key, val_fraction) and len(val) < max_val else train).append(pair)
    if not train:
        raise PipelineError(f"no training pairs in {where}; check preference.data.paths.")
    if not val:
        raise PipelineError(
            f"no validation pairs in {where} ({len(train)} in all); add pairs or raise preference.data.val_fraction."
        )
    return train, val


def render_answer(tokenizer, prompt: list[dict], answer: str, end_of_turn: str | None) -> tuple[Example, int]:
    """(the prompt and answer tokenized with only the answer's tokens labelled, prompt tokens).
    The prompt is the template's generation prompt, tokenized on its own."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    text = _text(tokenizer, messages)
    span = _turn_span(tokenizer, messages, len(prompt), text, end_of_turn)
    if span is None:  # the template renders the prompt differently once answered: use generation's
        head = _text(tokenizer, prompt, prompt=True)
        content = answer.strip()
        at = text.rfind(content)
        end = _answer_end(text, at, content, end_of_turn)
        if end is None:
            raise TemplateMismatch(len(prompt))
        text = head + text[at:end]
        span = (len(head), len(text))
    ex = _labelled(tokenizer, text, [span], cut_at_spans=True)
    prompt_tokens = next((i for i, label in enumerate(ex.labels) if label != IGNORE), len(ex.labels))
    return ex, prompt_tokens


def render_pairs(tokenizer, pairs: list[Pair], seq_len: int, end_of_turn: str | None) -> tuple[list[RenderedPair], int]:
    """(rendered pairs, pairs dropped because their prompt alone fills seq_len). Answers are cut
    at seq_len tokens with their prompt."""
    out, too_long = [], 0
    for n, pair in enumerate(pairs):
        try:
            (c, pc), (r, pr) = (
                render_answer(tokenizer, pair.prompt, a, end_of_turn) for a in (pair.chosen, pair.rejected)
            )
        except TemplateMismatch:
            raise PipelineError(
                f"the chat template does not render the answer of preference pair {n} after its prompt and "
                f"close it with its end-of-turn token; give one that does in "
                f"preference.chat_template=path/to/template.jinja."
            ) from None
        if c.input_ids[:pc] != r.input_ids[:pr]:  # cannot happen: the prompt is tokenized on its own
            raise PipelineError(f"preference pair {n}: the prompt's tokens differ between its answers.")
        if pc >= seq_len:
            too_long += 1
            continue
        shifted = [Example(ex.input_ids[:-1][:seq_len], ex.labels[1:][:seq_len]) for ex in (c, r)]
        out.append(RenderedPair(*shifted, pc))
    return out, too_long


def collate_pairs(pairs: list[RenderedPair], pair_ids: list[int], pad_id: int, pack_width: int = 0) -> dict:
    """A batch of pairs for the preference objective. Sequence 2k is pair k's chosen answer, 2k+1 its
    rejected one. pack_width 0: one sequence per row, right-padded (attention_mask); else the
    sequences packed first-fit into rows of at most pack_width tokens, positions restarting per
    sequence (attention stays within each sequence)."""
    seqs = [ex for p in pairs for ex in (p.chosen, p.rejected)]
    rows: list[list[int]] = []
    if pack_width:
        room: list[int] = []
        for s in sorted(range(len(seqs)), key=lambda s: -len(seqs[s].input_ids)):
            n = len(seqs[s].input_ids)
            slot = next((i for i, r in enumerate(room) if n <= r), None)
            if slot is None:
                rows.append([s])
                room.append(pack_width - n)
            else:
                rows[slot].append(s)
                room[slot] -= n
    else:
        rows = [[s] for s in range(len(seqs))]
    width = max(sum(len(seqs[s].input_ids) for s in row) for row in rows)
    shape = (len(rows), width)
    ids, labels = torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long)
    segments, positions = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(seqs[s].input_ids)
            ids[i, at : at + n] = torch.tensor(seqs[s].input_ids)
            labels[i, at : at + n] = torch.tensor(seqs[s].labels)
            segments[i, at : at + n] = s
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)  # the padding: one more sequence nothing attends to
    batch = {"input_ids": ids, "labels": labels, "segments": segments, "pair_ids": torch.tensor(pair_ids)}
    if pack_width:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (segments >= 0).long()
    return batch


class PairSamples:
    """Sample g of the run -> a pair, in an order shuffled per epoch by (seed, epoch). `flatten`:
    a packed micro-batch comes as one row, for flash-attention's varlen kernel, which transformers
    only uses on a single row (its sequences found from the position ids)."""

    def __init__(self, pairs: list[RenderedPair], seed: int, pad_id: int, pack_width: int = 0, flatten: bool = False):
        self.pairs, self.pad_id, self.pack_width, self.flatten = pairs, pad_id, pack_width, flatten
        self.order = EpochShuffle(len(pairs), seed)

    def batch(self, first_sample: int, size: int) -> dict:
        items = [self.order(first_sample + j) for j in range(size)]
        batch = collate_pairs([self.pairs[i] for i in items], items, self.pad_id, self.pack_width)
        if self.flatten and self.pack_width:
            batch = {k: v.reshape(1, -1) if k != "pair_ids" else v for k, v in batch.items()}
        return batch


def eval_pair_batches(pairs: list[RenderedPair], pad_id: int, size: int, pack_width: int = 0) -> list[dict]:
    return [
        collate_pairs(pairs[i : i + size], list(range(i, min(i + size, len(pairs)))), pad_id, pack_width)
        for i in range(0, len(pairs), size)
    ]
