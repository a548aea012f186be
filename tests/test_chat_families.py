"""The chat templates of the families people fine-tune (Llama 3, Qwen2.5, Gemma, Mistral, Phi-3,
SmolLM2, and a base with none): loss masks proven against the prompts generation uses, the
end-of-turn token found, trained and stopped at, and each family's recipe run end to end."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.config.model import LoraSpec
from pipeline.config.run import FinetuneSpec
from pipeline.data.chat import IGNORE, build_examples, render
from pipeline.errors import PipelineError
from pipeline.model.hf_dir import load_chat_base
from pipeline.model.inference import format_prompt, load_model, resolve_model
from pipeline.model.lora import apply_lora
from pipeline.model.tokenizer import end_of_turn, stop_ids, use_chat_template
from tests.chat_families import (
    FAMILIES,
    TEMPLATES,
    conversations,
    make_base,
    make_tokenizer,
    write_chats,
)
from tests.conftest import run_cli

RECIPES = {"no_template": "lora_chat"}  # the others: lora_<family>


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_tok(request):
    family = FAMILIES[request.param]
    tok = make_tokenizer(family)
    use_chat_template(tok, family.name)  # the base without one gets pipeline's
    return family, tok


def trained_runs(ex) -> list[tuple[int, list[int]]]:
    """(first input position, label ids) of each contiguous run of trained labels."""
    runs, start = [], None
    for t, label in enumerate(ex.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = t
        elif label == IGNORE and start is not None:
            runs.append((start, ex.labels[start:t]))
            start = None
    return runs


def test_end_of_turn_is_the_familys_own(family_tok):
    family, tok = family_tok
    assert end_of_turn(tok) == family.eot


def test_each_answer_and_its_end_of_turn_is_trained_after_the_prompt_generation_sees(family_tok):
    family, tok = family_tok
    eot = end_of_turn(tok)
    for conv in conversations(24, system=family.system):
        examples = render(tok, conv, eot)
        turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        runs = [(ex, start, ids) for ex in examples for start, ids in trained_runs(ex)]
        # Exactly the assistant's words and the end-of-turn token, once per turn, in order.
        assert [tok.decode(ids) for _, _, ids in runs] == [conv[i]["content"] + eot for i in turns]
        for (ex, start, _), i in zip(runs, turns):
            # Everything before a trained span is, token for token, the prompt generation gets.
            prompt = format_prompt(tok, conv[:i], chat=True)
            assert ex.input_ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
            # The ids are what the text re-tokenises to.
            assert tok(tok.decode(ex.input_ids), add_special_tokens=False)["input_ids"] == ex.input_ids


def test_mistral_system_prompt_trains_each_turn_as_its_own_prompt():
    tok = make_tokenizer(FAMILIES["mistral"])
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    # Its template writes the system prompt into the last user turn, so no single rendering
    # holds both turns with the prompts generation sees: one example per turn.
    out = build_examples(tok, [conv], 128, "</s>")
    assert out.split == 1 and len(out.examples) == 2
    for ex in out.examples:
        assert "Be brief." in tok.decode(ex.input_ids)


def test_template_refusals_and_mismatches_are_named(tmp_path):
    gemma = make_tokenizer(FAMILIES["gemma"])
    with_system = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    plain = with_system[1:]
    with pytest.raises(PipelineError, match=r"refuses conversation 0 \(System role not supported\).*skip_bad"):
        build_examples(gemma, [with_system, plain], 64, "<end_of_turn>", "gemma-base")
    out = build_examples(gemma, [with_system, plain], 64, "<end_of_turn>", "gemma-base", skip_bad=True)
    assert out.refused == 1 and len(out.examples) == 1
    shouting = make_tokenizer(FAMILIES["phi3"])
    shouting.chat_template = shouting.chat_template.replace("+ message['content'] +", "+ message['content'] | upper +")
    with pytest.raises(
        PipelineError, match=r"does not render message 1 \(an assistant turn\) of conversation 0.*generation"
    ):
        build_examples(shouting, [plain], 64, "<|end|>", "phi-shouting")


def test_base_without_template_gets_tokens_whose_rows_start_meaningful_and_train(tmp_path):
    base = make_base(FAMILIES["no_template"], tmp_path / "base")
    spec = FinetuneSpec(base=str(base))
    model, tok, template, added = load_chat_base(str(base), spec)
    assert template == "pipeline" and tok.convert_ids_to_tokens(added) == [
        "<|end|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
    ]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert torch.equal(emb[end], emb[tok.eos_token_id]) and torch.equal(head[end], head[tok.eos_token_id])
    user_words = tok("user", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("<|user|>")], emb[user_words].mean(0))

    peft = apply_lora(model, LoraSpec(r=4, alpha=8), added)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n and "trainable_tokens" in n for n in trainable)
    assert any("lm_head" in n and "trainable_tokens" in n for n in trainable)  # untied: the head's rows too
    before = peft.get_output_embeddings().weight.detach().clone()
    batch = tok.apply_chat_template(conversations(4)[:1][0], tokenize=True, return_dict=True, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    opt.step()
    merged = peft.merge_and_unload()
    changed = (merged.get_output_embeddings().weight != before).any(1).nonzero().flatten().tolist()
    assert set(changed) <= set(added) and end in changed


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"quantize": "8bit"}, "unknown; use 4bit"),
        ({"quantize": "4bit", "method": "full"}, "set finetune.method=lora"),
    ],
)
def test_quantize_options_are_checked(spec, message):
    with pytest.raises(PipelineError, match=message):
        FinetuneSpec(**spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_qlora_without_a_gpu_is_one_clear_line(tmp_path):
    base = make_base(FAMILIES["qwen2_5"], tmp_path / "base")
    with pytest.raises(PipelineError, match="needs a CUDA GPU.*remove finetune.quantize"):
        load_chat_base(str(base), FinetuneSpec(base=str(base), quantize="4bit"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_recipe_fine_tunes_a_tiny_model_to_end_its_turns(name, tmp_path):
    family = FAMILIES[name]
    base = make_base(family, tmp_path / "base")
    data = write_chats(tmp_path / "chat.jsonl", conversations(300, system=family.system))
    run_cli(
        f"recipe={RECIPES.get(name, 'lora_' + name)}",
        "run.name=ft",
        f"finetune.base={base}",
        f"finetune.data.paths=[{data}]",
        "finetune.train.max_steps=300",
        "finetune.train.lr=5e-3",
        "finetune.train.warmup_steps=5",
        "finetune.train.seq_len=96",
        "finetune.train.micro_batch_size=16",
        "finetune.train.batch_tokens=1536",
        "finetune.train.mixed_precision=no",
        "finetune.train.eval_every=0",
        "finetune.train.ckpt_every=1000",
        "finetune.packing=false",
        cwd=tmp_path,
    )
    facts = json.loads((tmp_path / "runs/ft/finetune/manifest.json").read_text())["facts"]
    assert facts["end_of_turn"] == family.eot and facts["final_val_loss"] < facts["initial_val_loss"]

    prompts = [c[:-1] for c in conversations(40, seed=7, system=family.system)]
    outputs = {}
    for target in ("merged", "adapter"):
        model, tok = load_model(resolve_model(str(tmp_path / "runs/ft/finetune" / target)), dtype="fp32")
        texts = [format_prompt(tok, p, chat=True) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=24, do_sample=False, eos_token_id=stop_ids(tok, model), pad_token_id=tok.pad_token_id
        )
        outputs[target] = out[:, enc["input_ids"].shape[1] :].tolist()
    assert outputs["merged"] == outputs["adapter"]
    with safe_open(tmp_path / "runs/ft/finetune/adapter/adapter_model.safetensors", "pt") as f:
        whole_layers = [k for k in f.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert not whole_layers  # new tokens' rows only, never the whole resized embedding
    eot = tok.convert_tokens_to_ids(family.eot)
    ended = [row[: row.index(eot)] for row in outputs["merged"] if eot in row]
    assert len(ended) >= 0.9 * len(prompts), f"{len(ended)}/{len(prompts)} answers end with {family.eot}"
    words = [tok.decode(row, skip_special_tokens=True) for row in ended]
    # Not empty: each starts the trained answer (tiny random models garble the words after it).
    assert sum(w.startswith("The") for w in words) >= 0.5 * len(prompts), words[:5]


def test_a_template_file_replaces_the_bases_own(tmp_path):
    tok = make_tokenizer(FAMILIES["qwen2_5"])
    template = tmp_path / "chatml_plain.jinja"
    template.write_text((TEMPLATES / "smollm2.jinja").read_text())
    assert use_chat_template(tok, "qwen", str(template)) == str(template)
    assert "SmolLM" in tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    with pytest.raises(PipelineError, match="finetune.chat_template=.*missing.jinja is not a file"):
        use_chat_template(tok, "qwen", str(tmp_path / "missing.jinja"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_recipe_trains_a_4bit_base_and_writes_a_full_merged_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = make_base(FAMILIES["qwen2_5"], tmp_path / "base")
    data = write_chats(tmp_path / "chat.jsonl", conversations(200))
    run_cli(
        "recipe=lora_qwen2_5",
        "run.name=q",
        f"finetune.base={base}",
        f"finetune.data.paths=[{data}]",
        "finetune.quantize=4bit",
        "finetune.train.max_steps=30",
        "finetune.train.lr=5e-3",
        "finetune.train.seq_len=96",
        "finetune.train.micro_batch_size=16",
        "finetune.train.batch_tokens=1536",
        "finetune.train.eval_every=0",
        cwd=tmp_path,
    )
    facts = json.loads((tmp_path / "runs/q/finetune/manifest.json").read_text())["facts"]
    assert facts["final_val_loss"] < facts["initial_val_loss"]
    merged = json.loads((tmp_path / "runs/q/finetune/merged/config.json").read_text())
    assert "quantization_config" not in merged  # a plain model, from the unquantized base


def test_template_tokens_a_base_never_trained_start_from_related_rows_and_train(tmp_path):
    base = make_base(FAMILIES["llama3"], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = make_tokenizer(FAMILIES["llama3"])
    tok.eos_token = "<|end_of_text|>"  # as in the base releases, whose template tokens' rows were never trained
    dead = tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    with torch.no_grad():
        model.get_input_embeddings().weight[dead] = 0
    model.save_pretrained(base)
    tok.save_pretrained(base)
    model, tok, template, new = load_chat_base(str(base), FinetuneSpec(base=str(base)))
    assert template == "base" and new == sorted(dead)
    emb = model.get_input_embeddings().weight
    assert (emb[dead].norm(dim=1) > 0).all()
    assert torch.equal(emb[tok.convert_tokens_to_ids("<|eot_id|>")], emb[tok.convert_tokens_to_ids("<|end_of_text|>")])


def test_a_prompt_ending_in_a_space_is_tokenized_as_generation_sees_it():
    tok = make_tokenizer(FAMILIES["phi3"])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
        "{% else %}Assistant: {{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    conv = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "The sky is red."}]
    whole = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    assert "ĠThe" in tok.convert_ids_to_tokens(whole)  # one token across the prompt's end
    [ex] = render(tok, conv, "<|end|>")
    [(start, ids)] = trained_runs(ex)
    assert ex.input_ids[:start] == tok(format_prompt(tok, conv[:1], chat=True), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The sky is red.<|end|>"


def test_pipeline_template_on_a_base_that_adds_bos_writes_it():
    tok = make_tokenizer(FAMILIES["mistral"])
    tok.chat_template = None
    assert use_chat_template(tok, "mistral-base") == "pipeline"
    assert format_prompt(tok, "hi", chat=True).startswith("<s><|user|>\nhi<|end|>")
