"""The tokenizer contract: pipeline's special tokens and chat template, BPE training, and what
every tokenizer the chain uses must have (a chat template to fine-tune with, a pad token)."""

from __future__ import annotations

import logging
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger("pipeline")
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, END_OF_TURN, *ROLE_TOKENS]

# Each turn is `<|role|>\n{content}<|end|>\n`. The {% generation %} block marks what the
# assistant says (content + end-of-turn), so `return_assistant_tokens_mask=True` gives the
# finetune loss mask straight from the template that generation also uses.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|end|>' }}{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def to_hf_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads on the left; training builds its own batches
    )


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad id; a tokenizer without one pads with EOS (never trained: masked out)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def ensure_chat_template(tokenizer, source: str) -> str:
    """Fine-tuning renders conversations with the base's own template; a base without one gets
    pipeline's, with a warning. Returns whose template it is: "base" or "pipeline"."""
    if tokenizer.chat_template:
        return "base"
    log.warning("%s has no chat template; using pipeline's (<|user|> ... <|end|>)", source)
    tokenizer.chat_template = CHAT_TEMPLATE
    return "pipeline"
