"""The tokenizer contract: pipeline's special tokens and chat template, BPE training, and what
every tokenizer the chain uses must have (a chat template to fine-tune with, a pad token)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data.encode import pieces
from pipeline.errors import PipelineError

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


# Templates that write today's date (Llama 3.x) get a fixed one, in training and in pipeline's
# generation alike, so examples (and the packing a resumed run repeats) do not change at midnight
# and prompts match what was trained. It is the date Llama's template itself falls back to;
# other templates ignore the variable.
TEMPLATE_VARS = {"date_string": "26 Jul 2024"}


def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips exactly.

    Documents are fed in pieces cut where the pre-tokenizer splits anyway, so the words counted,
    and the merges learned, are those of the whole documents: `tokenizers` reads 256 texts ahead,
    which for documents of many MB would hold GBs."""
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
    tok.train_from_iterator((piece for doc in docs for piece in pieces(doc)), trainer=trainer)
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


def use_chat_template(tokenizer, source: str, template_file: str | None = None) -> str:
    """Fine-tuning renders conversations with the base's own template, or the one in
    finetune.chat_template. A base without either gets pipeline's, and its special tokens are
    added to the vocabulary (the caller resizes the embeddings). Returns whose template it is."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise PipelineError(f"finetune.chat_template={template_file} is not a file; give a .jinja template file.")
        tokenizer.chat_template = path.read_text()
        return str(path)
    if tokenizer.chat_template:
        return "base"
    added = tokenizer.add_tokens([END_OF_TURN, *ROLE_TOKENS], special_tokens=True)
    log.warning(
        "%s has no chat template; using pipeline's (<|user|> ... <|end|>), %d special tokens added", source, added
    )
    # A base trained with BOS before every text keeps it: the template writes it, as chat
    # templates do, since rendered conversations are tokenized without special tokens.
    tokenizer.chat_template = ("{{- bos_token }}" if adds_bos(tokenizer) else "") + CHAT_TEMPLATE
    return "pipeline"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts exactly its BOS before a text (Llama, Mistral, Gemma bases)."""
    if tokenizer.bos_token_id is None:
        return False
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return tokenizer("x")["input_ids"] == [tokenizer.bos_token_id, *plain]


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (<|eot_id|>, <|im_end|>,
    <end_of_turn>, </s>, ...): the first special token rendered after an assistant's words."""
    if not tokenizer.chat_template:
        return None
    probe = "Probe answer 7"
    conv = [{"role": "user", "content": "Probe question"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False)
    except Exception:  # a template that cannot render a plain exchange has no end-of-turn to find
        return None
    after = text[text.rfind(probe) + len(probe) :]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special.update(tokenizer.all_special_tokens)
    found = [(after.find(t), t) for t in special if t and t in after]
    return min(found)[1] if found else None


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: EOS, the chat template's end-of-turn token, and the model's own."""
    ids = {tokenizer.eos_token_id}
    eot = end_of_turn(tokenizer)
    if eot:
        ids.add(tokenizer.convert_tokens_to_ids(eot))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


def stops_at_end_of_turn(model, tokenizer):
    """The model with its generation config stopping at the end-of-turn token too, so any HF tool
    that loads it (pipeline, transformers' generate, TGI, vLLM) ends answers where they end."""
    model.generation_config.eos_token_id = stop_ids(tokenizer, model)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
