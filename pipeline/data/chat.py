"""Render conversations with the tokenizer's chat template, mask all but the assistant's tokens,
and batch them (padded, or packed without cross-attention between examples).

The loss is only on what the assistant says, including its end-of-turn token. Templates with
`{% generation %}` blocks (ours) give that mask directly; for other templates each assistant
turn's span starts where the prompt the template renders for it ends (what generation is
given) and runs through the template's end-of-turn token (see `render`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.order import EpochShuffle
from pipeline.errors import PipelineError
from pipeline.model.tokenizer import TEMPLATE_VARS
from pipeline.train.loss import IGNORE


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class TemplateMismatch(Exception):
    """The template renders an assistant turn other than right after its own prompt."""


def _text(tokenizer, messages, prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **TEMPLATE_VARS)


def _turn_span(tokenizer, messages: list[dict], i: int, text: str, end_of_turn: str | None) -> tuple[int, int] | None:
    """Characters of assistant turn i in `text` (a rendering of messages[:i+1] and maybe more): from
    the end of the prompt the template renders for it (what generation is given) through the
    turn's end-of-turn token. None if that prompt is not where the turn starts in `text`."""
    prompt = _text(tokenizer, messages[:i], prompt=True) if i else ""
    if not text.startswith(prompt):
        return None
    content = messages[i]["content"].strip()  # templates may trim it
    at = text.find(content, len(prompt))
    if end_of_turn and at >= 0 and end_of_turn in text[len(prompt) : at]:
        return None  # found in a later turn: the template rewrote this one
    end = _answer_end(text, at, content, end_of_turn)
    if end is None and not end_of_turn:
        through = _text(tokenizer, messages[: i + 1])
        end = len(through.rstrip()) if text.startswith(through) else None
    return (len(prompt), end) if end is not None else None


def _answer_end(text: str, at: int, content: str, end_of_turn: str | None) -> int | None:
    """Where the answer found at `at` ends: after the end-of-turn token that follows its words with
    nothing but whitespace between. None if it is not there."""
    if at < 0 or not end_of_turn:
        return None
    end = text.find(end_of_turn, at + len(content))
    if end < 0 or text[at + len(content) : end].strip():
        return None
    return end + len(end_of_turn)


def _labelled(tokenizer, text: str, spans: list[tuple[int, int]], cut_at_spans: bool = False) -> Example:
    """`text` tokenized, labels = ids on tokens inside a trained character span. Where a token
    would straddle a span's start (a prompt ending in a space merged with the answer's first word),
    the text is cut there and each side tokenized alone, as generation sees the prompt.
    `cut_at_spans`: cut at every span's start (the prompt's tokens then never depend on the answer)."""
    if not tokenizer.is_fast:
        raise PipelineError(
            f"fine-tuning needs a fast (Rust) tokenizer for its loss masks; {tokenizer.name_or_path} "
            f"loads a slow one: convert it (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cuts = sorted({s for s, _ in spans if 0 < s < len(text) and (cut_at_spans or any(b < s < f for b, f in offsets))})
    ids, labels = [], []
    for lo, hi in zip([0, *cuts], [*cuts, len(text)]):
        enc = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
        for t, (b, f) in zip(enc["input_ids"], enc["offset_mapping"]):
            ids.append(t)
            labels.append(t if any(lo + b < e and s < lo + f for s, e in spans) else IGNORE)
    return Example(ids, labels)


def render(tokenizer, messages: list[dict], end_of_turn: str | None = None) -> list[Example]:
    """Examples of one conversation, labels = ids on what the assistant says (with its end-of-turn).

    Templates with {% generation %} blocks (pipeline's) give the mask directly. For others each
    assistant turn starts where the template's prompt for it ends and runs through its end-of-turn
    token. Usually that holds for every turn of the whole rendering: one example. Some templates
    render earlier turns differently once later turns follow (Mistral moves the system prompt to
    the last user turn; reasoning models drop past thinking): then each assistant turn becomes its
    own example, rendered exactly as generation will see its prompt.
    """
    template = tokenizer.chat_template or ""
    if "{% generation" in template or "{%- generation" in template:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        return [Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)])]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    text = _text(tokenizer, messages)
    spans = [_turn_span(tokenizer, messages, i, text, end_of_turn) for i in turns]
    if all(spans):
        return [_labelled(tokenizer, text, spans)]
    return [_turn_alone(tokenizer, messages, i, end_of_turn) for i in turns]


def _turn_alone(tokenizer, messages: list[dict], i: int, end_of_turn: str | None) -> Example:
    """Assistant turn i as its own example: the prompt generation would be given for it, then the
    turn as the template renders it last (from its words through its end-of-turn token)."""
    prompt = _text(tokenizer, messages[:i], prompt=True) if i else ""
    through = _text(tokenizer, messages[: i + 1])
    span = _turn_span(tokenizer, messages, i, through, end_of_turn)
    if span is not None:
        return _labelled(tokenizer, through, [span])
    # The template renders the prompt differently when the answer follows (Mistral drops the
    # system prompt then): train on the prompt generation sees.
    content = messages[i]["content"].strip()
    at = through.rfind(content)
    end = _answer_end(through, at, content, end_of_turn)
    if end is None:
        raise TemplateMismatch(i)
    text = prompt + through[at:end]
    return _labelled(tokenizer, text, [(len(prompt), len(text))])


def truncate(ex: Example, max_len: int) -> Example | None:
    """Keep the first max_len tokens; drop the example if nothing trained would be left."""
    ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
    return ex if ex.trained else None


@dataclass
class Rendered:
    examples: list[Example]
    too_long: int = 0  # examples with no trained token within seq_len (dropped)
    split: int = 0  # conversations rendered as one example per assistant turn
    refused: int = 0  # conversations the template refused (skipped with skip_bad)


def build_examples(
    tokenizer,
    conversations: list[list[dict]],
    max_len: int,
    end_of_turn: str | None = None,
    source: str = "the tokenizer",
    skip_bad: bool = False,
) -> Rendered:
    """Rendered, shifted (next-token) examples of at most max_len inputs."""
    from jinja2.exceptions import TemplateError

    out = Rendered([])
    for n, conv in enumerate(conversations):
        try:
            examples = render(tokenizer, conv, end_of_turn)
        except TemplateError as e:
            if not skip_bad:
                raise PipelineError(
                    f"the chat template of {source} refuses conversation {n} ({e}); fix such conversations (for "
                    f"example, templates without a system role) or set finetune.data.skip_bad=true to skip them."
                ) from None
            out.refused += 1
            continue
        except TemplateMismatch as e:
            raise PipelineError(
                f"the chat template of {source} does not render message {e} (an assistant turn) of conversation "
                f"{n} right after the prompt it renders for that turn, so the trained tokens cannot be found; give "
                f"a template with {{% generation %}} markers in finetune.chat_template=path/to/template.jinja."
            ) from None
        out.split += len(examples) > 1
        for ex in examples:
            # Next-token targets: the label at position t is token t+1.
            shifted = truncate(Example(ex.input_ids[:-1], ex.labels[1:]), max_len)
            if shifted is None:
                out.too_long += 1
            else:
                out.examples.append(shifted)
    if not out.examples and conversations:
        if out.refused == len(conversations):
            raise PipelineError(
                f"the chat template of {source} refuses every conversation; see the template's rules "
                f"(for example no system role) and fix the data."
            )
        raise PipelineError(f"no conversation keeps a trained token within finetune.train.seq_len={max_len}; raise it.")
    return out


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
    """Sample g of the run -> an example, in an order shuffled per epoch by (seed, epoch).
    `flatten`: packed rows of a micro-batch come as one row, for flash-attention's varlen kernel,
    which transformers only uses on a single row (its sequences found from the position ids)."""

    def __init__(
        self,
        examples: list[Example],
        seed: int,
        pad_id: int,
        packed_rows: list[dict] | None = None,
        flatten: bool = False,
    ):
        self.examples, self.packed, self.seed, self.pad_id = examples, packed_rows, seed, pad_id
        self.flatten = flatten
        self.n = len(packed_rows) if packed_rows is not None else len(examples)
        self.order = EpochShuffle(self.n, seed)

    def batch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        items = [self.order(first_sample + j) for j in range(size)]
        if self.packed is not None:
            rows = {
                k: torch.tensor([self.packed[i][k] for i in items]) for k in ("input_ids", "labels", "position_ids")
            }
            return {k: v.reshape(1, -1) for k, v in rows.items()} if self.flatten else rows
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
