"""Generation's weight dtype: explicit values obeyed, `auto` on a CPU measured (fp32 or bf16) once
per machine and model shape, then recalled."""

import pytest
import torch

from pipeline.config.run import EvalSpec, GenerateSpec
from pipeline.errors import PipelineError
from pipeline.model import inference
from pipeline.model.inference import faster_cpu_weights, load_model, resolve_model
from tests.chat_families import FAMILIES, make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(FAMILIES["qwen2_5"], tmp_path_factory.mktemp("gen") / "model")


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_auto_keeps_the_weights_that_generate_faster_and_leaves_the_fp32_model_as_it_was(base, monkeypatch, faster):
    model, tokenizer = load_model(resolve_model(str(base)), dtype="fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def timed(m, ids, new_tokens):  # one dtype decodes twice as fast as the other
        return 0.01 if (m.dtype == torch.bfloat16) == (faster == "bf16") else 0.02

    monkeypatch.setattr(inference, "_decode_seconds", timed)
    monkeypatch.setattr(inference, "bf16_speedup", lambda shapes, device: 1.0)  # the screen passes bf16 on
    chosen = faster_cpu_weights(model, tokenizer)
    assert chosen.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[faster]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_cpu_whose_bf16_matmuls_screen_slow_generates_in_fp32_without_timing_a_copy(base, monkeypatch):
    model, tokenizer = load_model(resolve_model(str(base)), dtype="fp32")
    monkeypatch.setattr(inference, "bf16_speedup", lambda shapes, device: 0.05)  # an AVX2-only CPU
    monkeypatch.setattr(inference, "_decode_seconds", lambda *a: pytest.fail("timed a bf16 copy"))
    assert faster_cpu_weights(model, tokenizer) is model


def test_auto_measures_on_a_cpu_and_an_explicit_dtype_is_obeyed(base, monkeypatch, caplog):
    caplog.set_level("INFO", logger="pipeline")
    model, _ = load_model(resolve_model(str(base)))
    assert model.dtype in (torch.float32, torch.bfloat16) and "measured on this machine" in caplog.text
    monkeypatch.setattr(inference, "faster_cpu_weights", lambda *a: pytest.fail("measured an explicit dtype"))
    assert load_model(resolve_model(str(base)), dtype="bf16")[0].dtype == torch.bfloat16
    with pytest.raises(PipelineError, match="generate.dtype='fp64' is unknown"):
        GenerateSpec(dtype="fp64")
    with pytest.raises(PipelineError, match="eval.dtype"):
        EvalSpec(dtype="float")


def test_auto_is_measured_once_per_machine_and_model_shape(base, monkeypatch):
    model, tokenizer = load_model(resolve_model(str(base)), dtype="fp32")
    monkeypatch.setattr(inference, "bf16_speedup", lambda shapes, device: 1.0)
    monkeypatch.setattr(inference, "_decode_seconds", lambda m, ids, n: 0.01 if m.dtype == torch.bfloat16 else 0.02)
    assert faster_cpu_weights(model, tokenizer).dtype == torch.bfloat16
    monkeypatch.setattr(inference, "_decode_seconds", lambda *a: pytest.fail("measured twice"))
    assert faster_cpu_weights(model, tokenizer).dtype == torch.bfloat16  # recalled, whatever a timer would say now
