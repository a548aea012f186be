"""GGUF out: `pipeline export` writes f16 and q8_0 files of a model this project pretrained (llama
and qwen3 blocks) and a Modelfile; read back through transformers' GGUF loader, the tokenizer
splits a mixed text the same way and the logits match (f16: within 1e-2 of the fp32 model's;
q8_0: the greedy tokens of most prompts)."""

import pytest
import torch

from pipeline.errors import PipelineError
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow
MIXED = "def f(x):\n    return x  # ünïcödé ✓ 🙂 <|user|> hi <|end|>\n\tthe model learns"


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def exported(request, tmp_path_factory, text_corpus_module):
    pytest.importorskip("gguf", reason="the gguf package writes GGUF files: pip install -e '.[test]'")
    cwd = tmp_path_factory.mktemp(f"export-{request.param}")
    args = ["stage=pretrain", "run.name=t", "data=text", f"data.paths=[{text_corpus_module}]", *TINY]
    run_cli(*args, "model=tiny", f"model.arch={request.param}", "train=tiny", "train.max_steps=40", cwd=cwd)
    proc = run_cli("export", "runs/t", "--type", "f16,q8_0", cwd=cwd)
    return cwd / "runs/t", proc


@pytest.fixture(scope="module")
def text_corpus_module(tmp_path_factory):
    from tests.conftest import make_documents

    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_documents(120)):
        (root / f"doc_{i:03d}.txt").write_text(doc)
    return root


def test_export_round_trips_through_transformers_gguf_loader(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, proc = exported
    assert "model.f16.gguf" in proc.stderr and (run / "export/Modelfile").read_text().startswith("# ollama create")
    hf = AutoModelForCausalLM.from_pretrained(run / "pretrain/model").eval()
    tok = AutoTokenizer.from_pretrained(run / "pretrain/model")
    prompts = [tok(p, return_tensors="pt").input_ids for p in ("the model", "def class", "data flows", "print self")]
    ids = torch.tensor([tok(MIXED).input_ids])
    for qtype in ("f16", "q8_0"):
        where = {"pretrained_model_name_or_path": run / "export", "gguf_file": f"model.{qtype}.gguf"}
        # transformers' reader ignores qwen3's attention.key_length (it assumes head_dim 128, as every
        # released Qwen3 has); llama.cpp reads it. Checked below in the file, given here.
        config = {"config": hf.config} if hf.config.model_type == "qwen3" else {}
        back = AutoModelForCausalLM.from_pretrained(**where, **config, dtype=torch.float32).eval()
        back_tok = AutoTokenizer.from_pretrained(**where)
        assert back_tok(MIXED).input_ids == ids[0].tolist()  # code, unicode and special tokens
        assert back_tok.eos_token == tok.eos_token and back_tok.chat_template is None  # a base: no template
        with torch.no_grad():
            diff = (hf(ids).logits - back(ids).logits).abs().max().item()
            same = [
                torch.equal(
                    hf.generate(p, max_new_tokens=8, do_sample=False),
                    back.generate(p, max_new_tokens=8, do_sample=False),
                )
                for p in prompts
            ]
        if qtype == "f16":
            assert diff < 1e-2, diff
            import gguf

            fields = gguf.GGUFReader(str(run / "export/model.f16.gguf")).fields
            assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp's name for GPT-2's split
            if hf.config.model_type == "qwen3":
                assert fields["qwen3.attention.key_length"].contents() == hf.config.head_dim
        else:
            assert sum(same) >= len(same) - 1, same  # quantized: the greedy tokens of most prompts


def test_an_exported_file_imports_back_as_a_model_dir(exported):
    """GGUF in of GGUF out: the importer reads qwen3's head size, which transformers' reader does not."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.gguf_import import import_gguf

    run, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(run / "pretrain/model").eval()
    back = AutoModelForCausalLM.from_pretrained(import_gguf(run / "export/model.f16.gguf")).eval()
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        assert (hf(ids).logits - back(ids).logits).abs().max().item() < 1e-2


def test_llama_cpp_names_for_pre_tokenizers():
    from pipeline.model.gguf_export import pre_tokenizer_name

    bpe = {"type": "BPE", "merges": []}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"model": bpe, "pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    both = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert pre_tokenizer_name({"model": bpe, "pre_tokenizer": both}) == "smollm"
    with pytest.raises(PipelineError, match="byte-level BPE"):
        pre_tokenizer_name({"model": {**bpe, "byte_fallback": True}, "pre_tokenizer": {"type": "Metaspace"}})
    with pytest.raises(PipelineError, match="pre-tokenizer"):
        pre_tokenizer_name({"model": bpe, "pre_tokenizer": {"type": "Split", "pattern": "x"}})


def test_the_modelfile_carries_the_chat_template_and_its_stop_token(exported):
    from transformers import AutoTokenizer

    from pipeline.model.gguf_export import ollama_modelfile

    run, _ = exported
    tok = AutoTokenizer.from_pretrained(run / "pretrain/model")
    text = ollama_modelfile(tok, "model.q8_0.gguf", chat=True)
    assert 'eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n' in text and 'PARAMETER stop "<|end|>"' in text
    assert "{{-" not in text.split("range .Messages }}", 1)[1]  # no trimmed newline between turns
    assert 'TEMPLATE """{{ .Prompt }}"""' in (run / "export/Modelfile").read_text()  # a base model completes


def test_an_architecture_gguf_export_does_not_know_is_refused_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.gguf_export import write_gguf
    from tests.chat_families import FAMILIES, make_base

    base = make_base(FAMILIES["qwen2_5"], tmp_path / "model")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    with pytest.raises(PipelineError, match="GGUF export supports LlamaForCausalLM, Qwen3ForCausalLM .* not Qwen2"):
        write_gguf(model, tok, tmp_path / "m.gguf", "f16", "m")
    assert not list(tmp_path.glob("*.gguf*"))
