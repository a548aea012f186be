"""Fixture tokenizers and random tiny models of the model families people fine-tune, each with
that family's real chat template (tests/fixtures/chat_templates/, as published with the models).

Tokenizers are byte-level BPE trained here on a small corpus, carrying the family's special
tokens, BOS/EOS/pad roles and BOS post-processing, so templates render and tokenize as they do
with the real ones; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.conftest import make_documents

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


@dataclass
class Family:
    name: str
    model_type: str
    special: list[str]
    eot: str  # the end-of-turn token the finetune must find, train and stop at
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    adds_bos: bool = False  # the tokenizer's post-processor prepends BOS (the template writes it too)
    tied: bool = True
    system: bool = True  # the template accepts a system turn
    template: str | None = None  # file in TEMPLATES; None: a base without a chat template
    config: dict = field(default_factory=dict)


FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "llama",
            [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ],
            "<|eot_id|>",
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            adds_bos=True,
            template="llama3.jinja",
        ),
        Family(
            "qwen2_5",
            "qwen2",
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "<|im_end|>",
            eos="<|im_end|>",
            pad="<|endoftext|>",
            template="qwen2_5.jinja",
        ),
        Family(
            "gemma",
            "gemma2",
            ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
            "<end_of_turn>",
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            system=False,
            template="gemma.jinja",
            config={"head_dim": 16, "query_pre_attn_scalar": 16},
        ),
        Family(
            "mistral",
            "mistral",
            ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
            "</s>",
            bos="<s>",
            eos="</s>",
            unk="<unk>",
            adds_bos=True,
            tied=False,
            template="mistral.jinja",
        ),
        Family(
            "phi3",
            "phi3",
            ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            "<|end|>",
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<unk>",
            tied=False,
            template="phi3.jinja",
        ),
        Family(
            "smollm2",
            "llama",
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "<|im_end|>",
            bos="<|im_start|>",
            eos="<|im_end|>",
            pad="<|im_end|>",
            unk="<|endoftext|>",
            template="smollm2.jinja",
        ),
        Family("no_template", "llama", ["<|endoftext|>"], "<|end|>", eos="<|endoftext|>", tied=False),
    ]
}

COLORS = "red green blue yellow black white orange purple brown grey".split()
THINGS = (
    "apple sky grass sun coal snow carrot plum bark stone leaf river cloud door chair lamp book cup road "
    "wall boat bird fish tree hat shoe"
).split()


def conversations(n: int, seed: int = 0, system: bool = True) -> list[list[dict]]:
    """Short question -> answer chats (some two-turn, some with a system turn) whose answers a
    tiny model can learn to end: the end-of-turn always follows a sentence's full stop."""
    rng = torch.Generator().manual_seed(seed)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=rng))]

    out = []
    for i in range(n):
        thing = pick(THINGS)
        conv = [
            {"role": "user", "content": f"What color is the {thing}?"},
            {"role": "assistant", "content": f"The {thing} is {pick(COLORS)}."},
        ]
        if i % 3 == 1:
            other = pick(THINGS)
            conv += [
                {"role": "user", "content": f"And the {other}?"},
                {"role": "assistant", "content": f"The {other} is {pick(COLORS)}."},
            ]
        if system and i % 4 == 2:
            conv.insert(0, {"role": "system", "content": "Answer in one short sentence."})
        out.append(conv)
    return out


def write_chats(path: Path, convs: list[list[dict]]) -> Path:
    """A JSONL chat file in the `messages` format, one conversation a line."""
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def make_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = make_documents(40) + [" ".join(m["content"] for m in c) for c in conversations(200)]
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=family.special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if family.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tok.token_to_id(family.bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    roles = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in roles.items() if v},
    )
    roles_named = {t for t in roles.values() if t}
    extra = [t for t in family.special if t not in roles_named]
    if extra:
        hf.add_tokens(extra, special_tokens=True)
    if family.template:
        hf.chat_template = (TEMPLATES / family.template).read_text()
    return hf


def make_base(family: Family, path: Path, seed: int = 0) -> Path:
    """A random tiny model of the family's architecture with its fixture tokenizer, saved as a
    plain HF dir (what a user's downloaded base looks like)."""
    tok = make_tokenizer(family)
    tok.save_pretrained(path)
    ids = {
        k: tok.convert_tokens_to_ids(getattr(tok, f"{k}_token")) if getattr(tok, f"{k}_token") else None
        for k in ("bos", "eos", "pad")
    }
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=family.tied,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        **family.config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # init zeroes the padding_idx row; a pretrained model's is not (SmolLM2 pads with <|im_end|>)
        emb = model.get_input_embeddings().weight
        zero = emb.abs().sum(1) == 0
        emb[zero] = torch.randn(int(zero.sum()), emb.shape[1]) * 0.02
    model.save_pretrained(path)
    return path
