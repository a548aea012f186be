"""Chat rendering, the assistant-only loss mask, packing without cross-talk, and chat data sources."""

import ast
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.data.chat import (
    IGNORE,
    ChatSamples,
    build_examples,
    pack,
    render,
    show_trained_span,
)
from pipeline.data.conversations import (
    ChatDataSpec,
    load_conversations,
    stdlib_conversations,
    to_messages,
)
from pipeline.errors import PipelineError
from pipeline.model.tokenizer import end_of_turn, to_hf_tokenizer, train_bpe
from tests.conftest import make_documents

SINGLE = [
    {"role": "user", "content": "add two numbers"},
    {"role": "assistant", "content": "def add(a, b): return a + b"},
]
MULTI = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    to_hf_tokenizer(train_bpe(make_documents(60), 400), 512).save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def trained_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_single_turn_trains_exactly_the_answer_and_end_of_turn(tok):
    [ex] = render(tok, SINGLE)
    assert trained_text(tok, ex) == "def add(a, b): return a + b<|end|>"


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tok):
    [ex] = render(tok, MULTI)
    assert trained_text(tok, ex) == "first answer<|end|>second answer<|end|>"
    spans = show_trained_span(tok, build_examples(tok, [MULTI], 512).examples[0])
    assert spans.count("[[") == 2 and "[[first answer<|end|>]]" in spans


def test_foreign_template_without_generation_markers_gets_the_same_mask(tok):
    plain = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.chat_template = plain
    [ex] = render(tok2, MULTI, end_of_turn(tok2))
    # Without markers each turn is found after its own prompt and runs through the end-of-turn token.
    assert trained_text(tok2, ex) == "first answer<|end|>second answer<|end|>"
    assert ex.input_ids == render(tok, MULTI)[0].input_ids


def test_shifted_examples_and_truncation_never_leave_an_empty_mask(tok):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    out = build_examples(tok, [SINGLE, long_prompt], max_len=64)
    assert out.too_long == 1 and len(out.examples) == 1
    ex = out.examples[0]
    [full] = render(tok, SINGLE)
    assert ex.input_ids == full.input_ids[:-1] and ex.labels == full.labels[1:]
    with pytest.raises(PipelineError, match="seq_len"):
        build_examples(tok, [long_prompt], max_len=64)


def tiny_llama(vocab):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def test_packed_examples_do_not_attend_to_each_other(tok):
    convs = [SINGLE, MULTI, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y z"}]]
    examples = build_examples(tok, convs, 128).examples
    rows = pack(examples, 128, tok.pad_token_id)
    assert len(rows) == 1
    row = rows[0]
    model = tiny_llama(len(tok))
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
            use_cache=False,
        ).logits[0]
        offset = 0
        for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
            n = len(ex.input_ids)
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset : offset + n], alone, rtol=1e-4, atol=1e-4)
            assert row["labels"][offset : offset + n] == ex.labels  # masks survive packing
            offset += n
    assert all(t == IGNORE for t in row["labels"][offset:])


def test_a_flattened_micro_batch_of_packed_rows_gives_the_rows_losses(tok):
    """flash-attention's varlen path takes one row: flattening must not let rows see each other."""
    from pipeline.train.loss import token_losses

    convs = [SINGLE, MULTI, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y z"}]] * 3
    rows = pack(build_examples(tok, convs, 64).examples, 64, tok.pad_token_id)
    assert len(rows) >= 2
    samples = ChatSamples([], seed=0, pad_id=tok.pad_token_id, packed_rows=rows)
    flat = ChatSamples([], seed=0, pad_id=tok.pad_token_id, packed_rows=rows, flatten=True)
    model = tiny_llama(len(tok))
    with torch.no_grad():
        by_row, one_row = samples.batch(0, len(rows)), flat.batch(0, len(rows))
        assert one_row["input_ids"].shape == (1, 64 * len(rows))
        torch.testing.assert_close(
            token_losses(model, one_row).view(len(rows), 64), token_losses(model, by_row), rtol=1e-4, atol=1e-4
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention needs a CUDA GPU")
def test_flash_attention_on_a_flattened_micro_batch_gives_the_rows_sdpa_losses(tok):
    pytest.importorskip("flash_attn")
    from pipeline.train.loss import token_losses

    convs = [SINGLE, MULTI, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y z"}]] * 3
    rows = pack(build_examples(tok, convs, 64).examples, 64, tok.pad_token_id)
    by_row = ChatSamples([], 0, tok.pad_token_id, packed_rows=rows).batch(0, len(rows))
    one_row = ChatSamples([], 0, tok.pad_token_id, packed_rows=rows, flatten=True).batch(0, len(rows))
    model = tiny_llama(len(tok)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        sdpa = token_losses(model, {k: v.cuda() for k, v in by_row.items()})
        model.set_attn_implementation("flash_attention_2")
        flash = token_losses(model, {k: v.cuda() for k, v in one_row.items()}).view(len(rows), 64)
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)  # bf16 kernels differ in rounding


def test_padded_batches_mask_padding(tok):
    examples = build_examples(tok, [SINGLE, MULTI], 128).examples
    b = ChatSamples(examples, seed=0, pad_id=tok.pad_token_id).batch(0, 2)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE)).all()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0"),
        ({"instruction": "x"}, "alpaca"),
        ({"text": "x"}, "no 'messages' or 'instruction'"),
    ],
)
def test_bad_records_say_what_is_wrong(row, message):
    with pytest.raises(ValueError, match=message):
        to_messages(row, ChatDataSpec(source="jsonl"))


def test_alpaca_record_becomes_a_conversation():
    conv = to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, ChatDataSpec(source="jsonl"))
    assert conv == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]


def test_jsonl_errors_name_file_and_line_or_skip(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": SINGLE})
    path.write_text(
        "\n".join([good] * 30 + ["{broken", json.dumps({"messages": [{"role": "user", "content": "q"}]})]) + "\n"
    )
    with pytest.raises(PipelineError, match=r"chat.jsonl:31: not valid JSON"):
        load_conversations(ChatDataSpec(source="jsonl", paths=[str(path)], val_fraction=0.5))
    spec = ChatDataSpec(source="jsonl", paths=[str(path)], val_fraction=0.5, skip_bad=True)
    varied = "\n".join(
        json.dumps({"messages": [SINGLE[0], {"role": "assistant", "content": f"a{i}"}]}) for i in range(30)
    )
    path.write_text(varied + "\n{broken\n")
    train, val, counts = load_conversations(spec)
    assert counts["bad"] == 1 and len(train) + len(val) == 30


def test_stdlib_pairs_ask_for_the_function_and_answer_with_its_source():
    pairs = []
    for conv in stdlib_conversations(800):
        pairs.append(conv)
        if len(pairs) == 200:
            break
    assert len(pairs) == 200
    for user, assistant in pairs:
        name, summary = user["content"].removeprefix("Write a Python function named ").split(": ", 1)
        assert len(summary.split()) >= 3  # a request, not a property name
        code = assistant["content"]
        node = ast.parse(code).body[0]
        assert code.startswith(("def ", "async def ")) and node.name == name
        assert ast.get_docstring(node) == summary and len(node.body) > 1  # the summary docstring, then code


def test_the_answer_keeps_the_signature_and_body_and_cuts_the_docstring_to_its_summary():
    from pipeline.data.conversations import _with_summary_docstring

    source = (
        "class A:\n"
        "    def f(self, a,\n"
        "          b=1):\n"
        '        """Add a and b.\n\n        Long prose that small models loop on.\n        """\n'
        "        # why\n"
        "        return a + b\n"
    )
    node = ast.parse(source).body[0].body[0]
    code = _with_summary_docstring(source.splitlines(keepends=True), node, "Add a and b.")
    assert code == 'def f(self, a,\n      b=1):\n    """Add a and b."""\n    # why\n    return a + b'
    only_doc = ast.parse('def g():\n    """Doc only."""\n').body[0]
    assert _with_summary_docstring(["def g():\n", '    """Doc only."""\n'], only_doc, "Doc only.") is None
    quote = ast.parse('def h():\n    """Ends in a quote\\""""\n    return 1\n').body[0]
    lines = ["def h():\n", '    """Ends in a quote\\""""\n', "    return 1\n"]
    assert _with_summary_docstring(lines, quote, 'Ends in a quote"') is None  # would not parse


@pytest.mark.slow
def test_stdlib_validation_answers_come_from_the_pretraining_validation_files_only():
    from pipeline.config.data import CorpusSpec
    from pipeline.data.conversations import stdlib_conversations_by_file
    from pipeline.data.sources import is_val

    spec = ChatDataSpec(source="stdlib", max_val_examples=10**6)
    assert spec.val_fraction == CorpusSpec().val_fraction  # the same split rule and share as the corpus
    from_val_files = [
        conv for text, conv in stdlib_conversations_by_file(spec.max_code_chars) if is_val(text, spec.val_fraction)
    ]
    train, val, _ = load_conversations(spec)
    assert val == from_val_files and len(val) > 50
    assert all(len(c[1]["content"]) <= spec.max_code_chars for c in train + val)
