"""Every spec of a run, built from the composed config and checked before any stage runs.

Hydra's schemas (registered in compose.py) catch unknown keys and wrong types; the dataclasses'
own checks catch bad values (`train.decay=cosin`, a negative lr) and the checks below catch
values that disagree with each other. So a typo in a late stage fails in a second, before the
tokenizer or the corpus is touched. This module stays light (no torch, no transformers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from pipeline.config.data import ChatDataSpec, CorpusSpec, PrepareSpec, TokenizerSpec
from pipeline.config.model import LoraSpec, ModelSpec
from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
RESUME_CHOICES = ("auto", "never")
FULL_LR_FOR_A_GIVEN_BASE = 1e-4  # above it, a full fine-tune of a pretrained model erases it: warned


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise PipelineError(f"generate.max_new_tokens={self.max_new_tokens} must be a positive number.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise PipelineError(
                f"generate.temperature={self.temperature} must be >= 0 (0 = greedy) and "
                f"generate.top_p={self.top_p} in (0, 1]."
            )

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kw


@dataclass
class FinetuneSpec:
    base: str | None = None  # null: this run's pretrain/model; else a local HF dir (or hub name)
    method: str = "lora"  # lora | full
    merge: bool = True  # also write merged/: base + adapter as one plain HF model
    packing: bool = False
    chat_template: str | None = None  # a .jinja file to use instead of the base's own template
    attn_implementation: str | None = None  # null: the model's default; eager | sdpa | flash_attention_2
    quantize: str | None = None  # 4bit: QLoRA, the frozen base in NF4 on a CUDA GPU (bitsandbytes)
    trust_remote_code: bool = False
    data: ChatDataSpec = field(default_factory=ChatDataSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise PipelineError(f"finetune.method={self.method!r} is unknown; use lora or full.")
        if self.quantize not in (None, "4bit"):
            raise PipelineError(f"finetune.quantize={self.quantize!r} is unknown; use 4bit (QLoRA) or null.")
        if self.quantize and self.method != "lora":
            raise PipelineError(
                "finetune.quantize=4bit trains LoRA adapters on a frozen 4-bit base; set finetune.method=lora."
            )
        if self.base and self.method == "full" and self.train.lr > FULL_LR_FOR_A_GIVEN_BASE:
            log.warning(
                "finetune: a full fine-tune of %s at lr %g would overwrite what it learned (the quickstart's lr "
                "is for the chain's own small model); use finetune.train.lr=2e-5 or a LoRA recipe",
                self.base,
                self.train.lr,
            )


@dataclass
class PreferenceDataSpec:
    source: str = "self"  # self: pairs the chain makes (see PairsSpec) | jsonl | hf
    paths: list[str] = field(default_factory=list)  # jsonl: prompt/chosen/rejected lines
    name: str | None = None  # hf dataset name
    config: str | None = None
    split: str = "train"
    val_fraction: float = 0.1
    max_val_pairs: int = 64
    skip_bad: bool = False  # true: skip (and count) malformed lines instead of stopping

    def __post_init__(self):
        if self.source not in ("self", "jsonl", "hf"):
            raise PipelineError(f"preference.data.source={self.source!r} is unknown; use self, jsonl or hf.")
        if not 0 < self.val_fraction < 1 or self.max_val_pairs <= 0:
            raise PipelineError("preference.data.val_fraction must be in (0, 1) and max_val_pairs positive.")


@dataclass
class PairsSpec:
    """preference.data.source=self: prompts of the fine-tuning training split answered greedily by
    the fine-tuned model; each answer that fails the eval's checks is a pair's rejected side, the
    reference solution its chosen side."""

    prompts: int = 256
    max_new_tokens: int = 256  # as the eval's: an answer fails here as it would there
    batch_size: int = 16

    def __post_init__(self):
        for name in ("prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"preference.pairs.{name}={getattr(self, name)} must be a positive number.")


@dataclass
class PreferenceSpec:
    in_chain: bool = False  # true: stage=all runs it after finetune, and generate and eval use its model
    base: str | None = None  # null: this run's finetune/merged; else a local HF model dir
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid: the share of pairs assumed mislabelled (conservative DPO)
    sft_weight: float = 1.0  # + this x the chosen answer's mean NLL per token (RPO): keeps chosen answers likely
    packing: bool = True  # pack the pairs' sequences into rows of train.seq_len (attention stays per sequence)
    merge: bool = True  # also write preference/merged/
    chat_template: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    data: PreferenceDataSpec = field(default_factory=PreferenceDataSpec)
    pairs: PairsSpec = field(default_factory=PairsSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    method = "lora"  # what it trains (a class attribute: not config); its reference is the base without it
    quantize = None

    def __post_init__(self):
        if self.loss not in ("sigmoid", "ipo"):
            raise PipelineError(f"preference.loss={self.loss!r} is unknown; use sigmoid (DPO) or ipo.")
        if not self.beta > 0 or not 0 <= self.label_smoothing < 0.5 or self.sft_weight < 0:
            raise PipelineError(
                f"preference.beta={self.beta} must be positive, preference.label_smoothing="
                f"{self.label_smoothing} in [0, 0.5) and preference.sft_weight={self.sft_weight} 0 or more."
            )


def check_dtype(dtype: str, key: str) -> None:
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise PipelineError(f"{key}={dtype!r} is unknown; use auto, fp32, bf16 or fp16.")


@dataclass
class EvalSpec:
    model: str | None = None  # null: this run's fine-tuned model and its base; or any model/adapter/run dir
    base: bool = True  # also score the fine-tuned model's base, for comparison
    max_prompts: int = 64  # per task set (stdlib, functions)
    max_new_tokens: int = 256
    batch_size: int = 8
    execute: bool = False  # run model-written answers against their tests (in the sandbox): an explicit opt-in
    timeout_seconds: float = 5.0  # per answer's run
    dtype: str = "auto"  # weights: auto = fp32 on a CPU (no timing race), the GPU's half precision
    trust_remote_code: bool = False

    def __post_init__(self):
        for name in ("max_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"eval.{name}={getattr(self, name)} must be a positive number.")
        check_dtype(self.dtype, "eval.dtype")
        if not self.timeout_seconds > 0:
            raise PipelineError(f"eval.timeout_seconds={self.timeout_seconds} must be positive.")


@dataclass
class GenerateSpec(Sampling):
    model: str | None = None  # null: this run's newest model; or an HF model dir / adapter dir / run dir
    adapter: str | None = None
    prompts: str | None = None  # .txt or .jsonl; null: built-in prompts
    chat: str = "auto"  # auto | true | false
    batch_size: int = 8
    show: int = 3
    # weights: auto (GPU: bf16/fp16; CPU: fp32 or bf16, whichever generates faster here) | fp32 | bf16 | fp16
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.chat = str(self.chat).lower()  # YAML and the command line may give a bool
        if self.chat not in ("auto", "true", "false"):
            raise PipelineError(f"generate.chat={self.chat!r} is unknown; use auto, true or false.")
        if self.batch_size <= 0:
            raise PipelineError(f"generate.batch_size={self.batch_size} must be a positive number.")
        check_dtype(self.dtype, "generate.dtype")

    def sampling(self) -> Sampling:
        return Sampling(**{f.name: getattr(self, f.name) for f in fields(Sampling)})

    def chat_mode(self, fine_tuned: bool) -> bool:
        """Chat template for fine-tuned models and plain completion for base ones, unless set."""
        return fine_tuned if self.chat == "auto" else self.chat == "true"


@dataclass
class LoggerSpec:
    trackers: list[str] = field(default_factory=list)  # wandb | tensorboard (metrics.jsonl is always written)
    project: str = "pipeline"


@dataclass
class RunSpecs:
    data: CorpusSpec
    tokenizer: TokenizerSpec
    prepare: PrepareSpec
    model: ModelSpec
    train: TrainSpec
    finetune: FinetuneSpec
    preference: PreferenceSpec
    generate: GenerateSpec
    eval: EvalSpec
    logger: LoggerSpec
    seed: int
    resume: str
    force: bool | list[str] | str = False  # true: rebuild every stage this command runs; [pretrain]: those named
    notes: list[str] = field(default_factory=list)  # what composing decided, for the log (not config)


def build_specs(cfg: dict) -> RunSpecs:
    """Typed, checked specs from the composed config (a plain, resolved dict)."""
    ft = dict(cfg["finetune"])
    finetune = FinetuneSpec(
        **{
            **ft,
            "data": ChatDataSpec(**ft["data"]),
            "lora": LoraSpec(**ft["lora"]),
            "train": TrainSpec(**ft["train"], key="finetune.train"),
        }
    )
    pf = dict(cfg["preference"])
    preference = PreferenceSpec(
        **{
            **pf,
            "data": PreferenceDataSpec(**pf["data"]),
            "pairs": PairsSpec(**pf["pairs"]),
            "lora": LoraSpec(**pf["lora"], key="preference.lora"),
            "train": TrainSpec(**pf["train"], key="preference.train"),
        }
    )
    specs = RunSpecs(
        data=CorpusSpec(**cfg["data"]),
        tokenizer=TokenizerSpec(**cfg["tokenizer"]),
        prepare=PrepareSpec(**cfg["prepare"]),
        model=ModelSpec(**cfg["model"]),
        train=TrainSpec(**cfg["train"]),
        finetune=finetune,
        preference=preference,
        generate=GenerateSpec(**cfg["generate"]),
        eval=EvalSpec(**cfg["eval"]),
        logger=LoggerSpec(**cfg["logger"]),
        seed=cfg["seed"],
        resume=cfg["resume"],
        force=cfg["force"],
    )
    if not isinstance(specs.seed, int) or isinstance(specs.seed, bool):
        raise PipelineError(f"seed={specs.seed!r} must be a whole number.")
    if specs.resume not in RESUME_CHOICES:
        raise PipelineError(f"resume={specs.resume} is unknown; use auto or never.")
    for key, train in (("train", specs.train), ("finetune.train", None if finetune.base else finetune.train)):
        if train is not None and train.seq_len > specs.model.max_seq_len:
            raise PipelineError(
                f"{key}.seq_len={train.seq_len} exceeds model.max_seq_len={specs.model.max_seq_len}; "
                f"lower one or raise the other."
            )
    return specs
