"""scripts/chat.py's turn handling (Ctrl-C stops the answer, an error ends the turn), BOS in
completion mode, and the start-up version check."""

import importlib.util
import re
import threading

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from pipeline.config.model import ModelSpec
from pipeline.config.run import Sampling
from pipeline.errors import PipelineError
from pipeline.model.build import build_model, hf_config
from pipeline.model.inference import add_special_tokens, format_prompt
from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe
from pipeline.requirements import check_versions, floors
from tests.conftest import REPO, make_documents


def chat_script():
    spec = importlib.util.spec_from_file_location("chat_script", REPO / "scripts/chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_chat_model():
    tok = to_hf_tokenizer(train_bpe(make_documents(40), 300), 256)
    config = hf_config(
        ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=256),
        len(tok),
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    return build_model(config, 0).eval(), tok


class Terminal:
    """Collects the streamed answer; Ctrl-C arrives as the `interrupt_at`-th piece is printed."""

    def __init__(self, interrupt_at=None):
        self.pieces, self.interrupt_at = [], interrupt_at

    def write(self, text):
        self.pieces.append(text)
        if len(self.pieces) == self.interrupt_at:
            raise KeyboardInterrupt

    def flush(self):
        pass


def test_ctrl_c_stops_the_generation_itself(tiny_chat_model):
    model, tok = tiny_chat_model
    chat = chat_script()
    sampling = Sampling(max_new_tokens=120, temperature=0)
    _, full, _, interrupted = chat.stream_answer(model, tok, "the model", sampling, Terminal())
    assert full == 120 and not interrupted  # this random model does not stop by itself
    threads = threading.active_count()
    _, n, _, interrupted = chat.stream_answer(model, tok, "the model", sampling, Terminal(interrupt_at=2))
    assert interrupted and n < 30 and threading.active_count() == threads  # no generation left running


def test_an_error_inside_generation_ends_the_turn_with_one_line(tiny_chat_model):
    model, tok = tiny_chat_model
    chat = chat_script()

    class Broken:
        device, generation_config = model.device, model.generation_config

        def generate(self, **kwargs):
            raise RuntimeError("out of memory\nlong details")

    with pytest.raises(PipelineError, match=r"generation failed \(RuntimeError: out of memory\)"):
        chat.stream_answer(Broken(), tok, "the model", Sampling(max_new_tokens=5), Terminal())


def test_completion_mode_starts_with_bos_where_the_tokenizer_adds_one(tiny_chat_model):
    _, ours = tiny_chat_model
    assert not add_special_tokens(ours, chat=False)  # pipeline's tokenizer adds no BOS
    raw = train_bpe(make_documents(40), 300)
    bos_id = raw.token_to_id("<|bos|>")
    raw.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>")
    assert add_special_tokens(llama_like, chat=False) and not add_special_tokens(llama_like, chat=True)
    prompt = format_prompt(llama_like, "def f", chat=False)
    assert llama_like(prompt, add_special_tokens=add_special_tokens(llama_like, False))["input_ids"][0] == bos_id
    raw.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", bos_id), ("<|eos|>", raw.token_to_id("<|eos|>"))]
    )
    adds_eos_too = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>")
    assert not add_special_tokens(adds_eos_too, chat=False)  # never an EOS after the prompt


def test_every_floor_of_pyproject_is_checked_with_the_fix():
    required = floors()  # from the installed metadata, i.e. pyproject.toml
    assert {"torch", "transformers", "peft", "accelerate", "datasets"} <= set(required)
    assert floors(["torch>=2.9", "deepspeed>=0.16; extra == 'deepspeed'", "numpy"]) == {"torch": "2.9"}
    check_versions()  # this environment satisfies them
    for package, lowest in required.items():
        older = {**required, package: "0.0.1"}
        fix = re.escape(f"pip install -U '{package}>={lowest}'")
        with pytest.raises(PipelineError, match=rf"{package} 0\.0\.1 is installed .* {fix}"):
            check_versions(lambda name, older=older: older[name], required)
    check_versions(lambda name: "2.13.0+cpu", {"torch": "2.13"})  # a local build tag still satisfies
