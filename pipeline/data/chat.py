"""Render conversations with the tokenizer's chat template, mask all but the assistant's tokens,
and batch them (padded, or packed without cross-attention between examples).

The loss is only on what the assistant says, including its end-of-turn token. Templates with
`{% generation %}` blocks (ours) give that mask directly; for other templates each assistant
turn's span is found by rendering the conversation up to it (prompt) and through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.order import EpochShuffle
from pipeline.errors import PipelineError
from pipeline.train.loss import IGNORE


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def render(tokenizer, messages: list[dict]) -> Example:
    """Token ids of the whole conversation and labels = ids on assistant tokens, IGNORE elsewhere."""
    if "{% generation" in (tokenizer.chat_template or "") or "{%- generation" in (tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)])
    ids = _ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_ids(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def truncate(ex: Example, max_len: int) -> Example | None:
    """Keep the first max_len tokens; drop the example if nothing trained would be left."""
    ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
    return ex if ex.trained else None


def build_examples(tokenizer, conversations: list[list[dict]], max_len: int) -> tuple[list[Example], int]:
    """Rendered, shifted (next-token) examples of at most max_len inputs; returns (examples, dropped)."""
    examples, dropped = [], 0
    for conv in conversations:
        ex = render(tokenizer, conv)
        # Next-token targets: the label at position t is token t+1.
        shifted = truncate(Example(ex.input_ids[:-1], ex.labels[1:]), max_len)
        if shifted is None:
            dropped += 1
        else:
            examples.append(shifted)
    if not examples:
        raise PipelineError(
            f"no conversation keeps a trained token within finetune.train.seq_len={max_len}; raise it."
        )
    return examples, dropped


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[dict]:
    """Greedy first-fit packing into rows of seq_len with position ids restarting per example.

    Position ids that restart tell transformers' mask builder (with attention_mask=None) to
    make the attention block-diagonal, so packed examples never see each other.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        for i, r in enumerate(room):
            if n <= r:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(seq_len - n)
    packed = []
    for row in rows:
        ids, labels, pos = [], [], []
        for ex in row:
            ids += ex.input_ids
            labels += ex.labels
            pos += list(range(len(ex.input_ids)))
        fill = seq_len - len(ids)
        ids += [pad_id] * fill
        labels += [IGNORE] * fill
        pos += list(range(fill))  # the padding is one more "example" that nothing attends to
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def pad_batch(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; the attention mask hides the padding."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


class ChatSamples:
    """Sample g of the run -> an example, in an order shuffled per epoch by (seed, epoch)."""

    def __init__(self, examples: list[Example], seed: int, pad_id: int, packed_rows: list[dict] | None = None):
        self.examples, self.packed, self.seed, self.pad_id = examples, packed_rows, seed, pad_id
        self.n = len(packed_rows) if packed_rows is not None else len(examples)
        self.order = EpochShuffle(self.n, seed)

    def batch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        items = [self.order(first_sample + j) for j in range(size)]
        if self.packed is not None:
            return {k: torch.tensor([self.packed[i][k] for i in items]) for k in ("input_ids", "labels", "position_ids")}
        return pad_batch([self.examples[i] for i in items], self.pad_id)


def eval_batches(examples: list[Example], pad_id: int, size: int) -> list[dict]:
    return [pad_batch(examples[i : i + size], pad_id) for i in range(0, len(examples), size)]


def show_trained_span(tokenizer, ex: Example) -> str:
    """The example as text with the trained tokens wrapped in [[ ]] (to check the mask by eye)."""
    out, inside = [], False
    for tok, lab in zip(ex.input_ids[1:] + [None], ex.labels):
        trained = lab != IGNORE
        if trained != inside:
            out.append("[[" if trained else "]]")
            inside = trained
        if lab != IGNORE:
            out.append(tokenizer.decode([lab]))
        elif tok is not None:
            out.append(tokenizer.decode([tok]))
    if inside:
        out.append("]]")
    return tokenizer.decode(ex.input_ids[:1]) + "".join(out)
