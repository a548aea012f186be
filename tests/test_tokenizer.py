import pytest
from transformers import AutoTokenizer

from pipeline.data.sources import take_bytes
from pipeline.model.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    SPECIAL_TOKENS,
    to_hf_tokenizer,
    train_bpe,
)
from tests.conftest import make_documents

SAMPLES = [
    "plain ASCII text, with punctuation!?",
    "def f(x):\n\tif x:\t \n\t\treturn x  \n   \n",  # tabs and trailing spaces
    "日本語のテキストと中文字符",  # CJK
    "emoji 🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "\ufffd\u200b\ufeff\U0010ffff e\u0301 \u202e rtl \x00 nul \x7f",  # replacement char, ZW, BOM, PUA, combining
    "  leading spaces and <|end|> a literal marker",
    "",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok = train_bpe(make_documents(80), vocab_size=400)
    out = tmp_path_factory.mktemp("tok")
    to_hf_tokenizer(tok, model_max_length=256).save_pretrained(out)
    return out


@pytest.mark.parametrize("text", SAMPLES)
def test_auto_tokenizer_round_trips_exactly(hf_dir, text):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_chat_template_are_saved(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.eos_token == EOS and tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1, t
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_template_marks_only_assistant_content_and_end_of_turn(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "the model"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "the model<|end|>"


def test_take_bytes_stops_after_budget():
    docs = ["a" * 10] * 10
    assert len(list(take_bytes(docs, 25))) == 3
    assert len(list(take_bytes(docs, None))) == 10
