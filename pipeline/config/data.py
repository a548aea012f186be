"""Specs of the corpus, the chat data, the tokenizer and the token shards (conf/data, conf/tokenizer,
finetune.data, prepare)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

SOURCES = ("stdlib", "text", "jsonl", "parquet", "hf")


@dataclass
class CorpusSpec:
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    glob: str = "**/*.txt"  # files taken from a directory given in `paths`
    text_field: str = "text"
    separator: str | None = None  # split each text file into documents at this string; \n, \t, \r understood
    name: str | None = None  # hf: dataset name
    config: str | None = None  # hf: dataset config
    split: str = "train"  # hf: dataset split
    val_fraction: float = 0.05
    max_bytes: int | None = None  # stop reading the corpus after about this much text (null: all of it)
    max_docs: int | None = None  # ... or after this many documents
    long_document_bytes: int | None = None  # a file read whole above this is read in segments (null: 64 MiB)

    def __post_init__(self):
        if self.separator:  # the command line passes `\n` as two characters
            escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
            self.separator = re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], self.separator)
        if self.source not in SOURCES:
            raise PipelineError(f"data.source={self.source!r} is unknown; use one of {', '.join(SOURCES)}.")
        for key in ("max_bytes", "max_docs", "long_document_bytes"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PipelineError(f"data.{key}={value!r} must be a positive whole number, or null for no limit.")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"data.val_fraction={self.val_fraction} must be between 0 and 1 (e.g. 0.05).")


@dataclass
class ChatDataSpec:
    source: str = "stdlib"  # stdlib | jsonl | hf
    paths: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | messages | alpaca (per line, for jsonl and hf)
    messages_field: str = "messages"
    name: str | None = None  # hf dataset name
    config: str | None = None
    split: str = "train"
    val_fraction: float = 0.05
    max_val_examples: int = 256  # validation is run before and after training: keep it quick
    max_examples: int | None = None
    max_code_chars: int = 400  # stdlib: skip longer functions (answers must fit the quickstart's 256 tokens whole)
    skip_bad: bool = False  # true: skip and count malformed lines instead of stopping

    def __post_init__(self):
        if self.source not in ("stdlib", "jsonl", "hf"):
            raise PipelineError(f"finetune.data.source={self.source!r} is unknown; use stdlib, jsonl or hf.")
        if self.format not in ("auto", "messages", "alpaca"):
            raise PipelineError(f"finetune.data.format={self.format!r} is unknown; use auto, messages or alpaca.")


@dataclass
class TokenizerSpec:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_train_bytes: int | None = 1_000_000_000  # train on at most this much of the training split
    model_max_length: int = 2048

    def __post_init__(self):
        if self.vocab_size < 264:  # 256 bytes + pipeline's 7 special tokens + at least one merge
            raise PipelineError(f"tokenizer.vocab_size={self.vocab_size} is too small; use at least 264 (e.g. 8192).")
        if self.model_max_length <= 0 or (self.max_train_bytes is not None and self.max_train_bytes <= 0):
            raise PipelineError("tokenizer.model_max_length and tokenizer.max_train_bytes must be positive.")


@dataclass
class PrepareSpec:
    shard_bytes: int = 64 * 2**20  # text per chunk: one shard per split, the unit of work per rank and of resume

    def __post_init__(self):
        if not isinstance(self.shard_bytes, int) or self.shard_bytes <= 0:
            raise PipelineError(f"prepare.shard_bytes={self.shard_bytes} must be a positive number of bytes.")
