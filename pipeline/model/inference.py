"""Find, load and sample from a model: shared by the `generate` stage and `scripts/chat.py`.

Resolution of a target path:
  run dir     -> preference/ when it was trained from the run's current finetune/ (or the run has
                 none), else finetune/,
                 each merged/ else adapter/ on its base; else pretrain/model
  model dir   -> itself (any HF causal-LM directory)
  adapter dir -> the adapter on the base recorded in its adapter_config.json
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from pipeline.artifacts import manifest_hash, read_manifest
from pipeline.config.run import Sampling
from pipeline.device import DTYPES, SCREEN_SLOWER, best_device, bf16_speedup, half_precision, model_matmul_shapes
from pipeline.errors import PipelineError, first_line
from pipeline.machine_record import recall, remember
from pipeline.model.gguf_import import local_model_dir
from pipeline.model.hf_dir import grow_vocab, load_causal_lm, load_tokenizer
from pipeline.model.lora import adapter_base, check_adapter_base
from pipeline.model.tokenizer import (
    TEMPLATE_VARS,
    adds_bos,
    ensure_pad_token,
    stop_ids,
)

log = logging.getLogger("pipeline")
WEIGHT_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelChoice:
    model_dir: str
    adapter_dir: str | None
    kind: str  # merged | adapter | pretrain | model
    chat: bool  # fine-tuned for chat (else plain completion)

    @property
    def tokenizer_dir(self) -> str:
        return self.adapter_dir or self.model_dir

    def describe(self) -> str:
        return f"{self.model_dir} + adapter {self.adapter_dir}" if self.adapter_dir else self.model_dir


def _complete(stage_dir: Path) -> bool:
    try:
        m = read_manifest(stage_dir)
    except PipelineError:
        return False
    return bool(m) and m.get("status") == "complete"


def _built_from(stage_dir: Path, upstream_dir: Path) -> bool | None:
    """Whether stage_dir's artifact was built from upstream_dir's current one (None: either one
    is no artifact of this project, or stage_dir did not take upstream_dir's stage as input)."""
    try:
        mine, theirs = read_manifest(stage_dir), read_manifest(upstream_dir)
    except PipelineError:
        return None
    if not mine or not theirs:
        return None
    recorded = mine.get("inputs", {}).get(theirs.get("stage"), {}).get("manifest_hash")
    return None if recorded is None else recorded == manifest_hash(theirs)


def _follows(stage_dir: Path, upstream_dir: Path) -> bool:
    return bool(_built_from(stage_dir, upstream_dir))


def adapter_choice(adapter_dir: Path) -> ModelChoice:
    """An adapter on the base its adapter_config.json names, refused where that base is an artifact
    rebuilt since the adapter was trained (the same path then holds other weights)."""
    base = adapter_base(adapter_dir)
    if _built_from(adapter_dir.parent, Path(base).parent) is False:
        run, stage = adapter_dir.parent.parent, adapter_dir.parent.name
        raise PipelineError(
            f"the adapter {adapter_dir} was trained on an earlier build of {base}, which has been rebuilt "
            f"since; retrain it: pipeline stage={stage} run.root={run.parent} run.name={run.name} "
            f"force=[{stage}] (with that run's other settings)."
        )
    return ModelChoice(base, str(adapter_dir), "adapter", chat=True)


def trained_model(stage_dir: Path) -> ModelChoice | None:
    """The chat model a fine-tuning stage published: merged/, else adapter/ on its base."""
    if (stage_dir / "merged").is_dir():
        return ModelChoice(str(stage_dir / "merged"), None, "merged", chat=True)
    if (stage_dir / "adapter").is_dir():
        return adapter_choice(stage_dir / "adapter")
    return None


def has_chat_template(model_dir: Path) -> bool:
    config = model_dir / "tokenizer_config.json"
    try:
        in_config = "chat_template" in json.loads(config.read_text()) if config.is_file() else False
    except ValueError:
        in_config = False
    return in_config or (model_dir / "chat_template.jinja").is_file()


def pretrained_here(model_dir: Path) -> bool:
    """A base this project pretrained (runs/NAME/pretrain/model): its template is untrained."""
    try:
        return (read_manifest(model_dir.parent) or {}).get("stage") == "pretrain"
    except PipelineError:
        return False


def resolve_model(target: str, adapter: str | None = None) -> ModelChoice:
    target = local_model_dir(target)  # a .gguf file: its imported HF dir
    p = Path(target).expanduser()
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise PipelineError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json).")
        if not (p / "config.json").is_file():
            raise PipelineError(f"{target} is not a model dir (no config.json); --adapter needs its base model dir.")
        check_adapter_base(str(p), adapter)
        return ModelChoice(str(p), adapter, "adapter", chat=True)
    if (p / "adapter_config.json").is_file():
        return adapter_choice(p)
    if (p / "config.json").is_file():  # a chat model (its own template) is chatted with; a base completes
        return ModelChoice(str(p), None, "model", chat=has_chat_template(p) and not pretrained_here(p))
    if p.is_dir():
        ft, pref, pre = p / "finetune", p / "preference", p / "pretrain"
        for stage_dir in (pref, ft) if _follows(pref, ft) or not _complete(ft) else (ft,):
            if _complete(stage_dir) and (choice := trained_model(stage_dir)):
                return choice
        if _complete(pre) and (pre / "model").is_dir():
            return ModelChoice(str(pre / "model"), None, "pretrain", chat=False)
        raise PipelineError(
            f"{p} has no finished model yet; run `pipeline stage=pretrain run.name={p.name} run.root={p.parent}` "
            f"(or stage=finetune) first."
        )
    raise PipelineError(f"{target} does not exist; give a run dir (runs/NAME), an HF model dir or an adapter dir.")


def load_model(choice: ModelChoice, trust_remote_code: bool = False, dtype: str = "auto", device=None):
    """(model in eval mode on the best device, tokenizer with left padding). dtype: fp32, bf16,
    fp16, or auto: the GPU's half precision, and on a CPU whichever of fp32 and bf16 weights
    decodes faster here, measured once per machine and model shape (a CPU with bf16 instructions
    may run either one faster). `device`: another than the best one (export writes from the CPU)."""
    if dtype not in WEIGHT_DTYPES:
        raise PipelineError(f"dtype={dtype!r} is unknown; use auto, fp32, bf16 or fp16.")
    device = device or best_device()
    tokenizer = load_tokenizer(choice.tokenizer_dir, trust_remote_code)
    tokenizer.padding_side = "left"
    ensure_pad_token(tokenizer)
    weights = WEIGHT_DTYPES[dtype] or DTYPES[half_precision(device)]
    model = load_causal_lm(choice.model_dir, trust_remote_code, dtype=weights)
    if choice.adapter_dir:
        from peft import PeftModel

        grow_vocab(model, tokenizer)  # tokens added for the chat template when the base had none
        try:
            model = PeftModel.from_pretrained(model, choice.adapter_dir)
        except (RuntimeError, ValueError, KeyError) as e:
            raise PipelineError(
                f"the adapter {choice.adapter_dir} does not fit the model {choice.model_dir} ({first_line(e)}); "
                f"use the base model it was trained on."
            ) from None
    model = model.to(device).eval()
    if dtype == "auto" and device.type == "cpu":
        model = faster_cpu_weights(model, tokenizer)
    return model, tokenizer


def _decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t0


def faster_cpu_weights(model, tokenizer, new_tokens: int = 8):
    """The model in fp32 or bf16, whichever generates faster on this CPU: measured once per
    machine and model shape (a greedy batch-1 generation of a few tokens, timed in turns after a
    warm-up each; milliseconds for the quickstart model), then recalled, so a second run of the same
    model decodes with the same weights. Skipped where a bf16 copy would not fit in free memory."""
    c = model.config
    shape = f"{c.model_type} L{c.num_hidden_layers} d{c.hidden_size} V{c.vocab_size}"
    known = recall(f"generation weights {shape}")
    if known in ("fp32", "bf16"):
        log.info("generation: %s weights, as measured before on this machine for this model shape", known)
        return model if known == "fp32" else model.to(torch.bfloat16)
    copy_bytes = sum(p.numel() for p in model.parameters()) * 2
    if copy_bytes > psutil.virtual_memory().available / 4:
        log.info("generation: fp32 weights (a bf16 copy to time would not fit comfortably in free memory)")
        return model
    choice, chosen = _measure_cpu_weights(model, tokenizer, new_tokens)
    remember(f"generation weights {shape}", choice)
    return chosen


def _measure_cpu_weights(model, tokenizer, new_tokens: int):
    """(fp32 or bf16, the model in it); the fp32 model given is left as it was."""
    speedup = bf16_speedup(model_matmul_shapes(model.config, tokens=8), torch.device("cpu"))
    if speedup < 1 / SCREEN_SLOWER:  # an AVX2-only CPU: a bf16 copy would decode many times slower
        log.info("generation: fp32 weights, measured on this machine (bf16 matmuls run at %.2fx fp32's speed)", speedup)
        return "fp32", model
    candidates = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in candidates}
    with torch.inference_mode():
        for m in candidates.values():
            _decode_seconds(m, ids, 2)  # warm-up
        for _ in range(3):
            for name, m in candidates.items():
                times[name].append(_decode_seconds(m, ids, new_tokens))
    ms = {name: 1000 * statistics.median(t) / new_tokens for name, t in times.items()}
    choice = "bf16" if ms["bf16"] < 0.95 * ms["fp32"] else "fp32"
    log.info(
        "generation: %s weights, measured on this machine and kept for this model shape "
        "(fp32 %.1f ms, bf16 %.1f ms per token at batch 1)",
        choice,
        ms["fp32"],
        ms["bf16"],
    )
    return choice, candidates[choice]


def format_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> str:
    """A chat prompt through the template (with the assistant turn opened), or plain text."""
    if isinstance(prompt, str) and not chat:
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **TEMPLATE_VARS)


def add_special_tokens(tokenizer, chat: bool) -> bool:
    """How to tokenize a formatted prompt: a chat template writes its own special tokens; plain
    text gets the tokenizer's BOS where it adds exactly that (Llama-family base models expect it),
    never an EOS after the prompt."""
    return not chat and adds_bos(tokenizer)


@torch.no_grad()
def generate_batch(model, tokenizer, texts: list[str], sampling: Sampling, chat: bool = True) -> list[dict]:
    """Left-padded batched generation with the KV cache; one record per formatted prompt."""
    special = add_special_tokens(tokenizer, chat)
    enc = tokenizer(  # no token_type_ids: generate in transformers < 4.57 refuses them for causal LMs
        texts, return_tensors="pt", padding=True, add_special_tokens=special, return_token_type_ids=False
    ).to(model.device)
    stops = stop_ids(tokenizer, model)
    torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    out = model.generate(**enc, **sampling.generate_kwargs(), eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1] :]
    records = []
    for i in range(len(texts)):
        ids = new[i].tolist()
        n = next((k for k, t in enumerate(ids) if t in stops), len(ids))
        records.append(
            {
                "completion": tokenizer.decode(ids[:n], skip_special_tokens=True),
                "prompt_tokens": int(enc["attention_mask"][i].sum()),
                "completion_tokens": n,
            }
        )
    total = sum(r["completion_tokens"] for r in records)
    for r in records:
        r["batch_tokens_per_s"] = round(total / seconds, 1)
    return records
