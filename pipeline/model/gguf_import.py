"""GGUF in: a `.gguf` file (llama.cpp, Ollama, LM Studio) as a Hugging Face model directory.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package)
and dequantizes them, but marks such a model as quantized and will not `save_pretrained` it; the
model is rebuilt from its config and given the dequantized weights instead. The directory is
written once into the user's cache ($XDG_CACHE_HOME/pipeline/gguf/<name>-<sha256>/: fp32 weights,
tokenizer, chat template, a generation config that stops at the template's end-of-turn, and a
manifest), atomically, and reused while the file's content hash is unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path

from pipeline.artifacts import MANIFEST, build_manifest, read_manifest, replace_dir, verify_files, write_json_atomic
from pipeline.errors import PipelineError, first_line
from pipeline.machine_record import read_cache, record_path, write_cache

log = logging.getLogger("pipeline")
IMPORT_VERSION = 2  # raised when the import writes something else: older cached imports are redone
ARCH_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def is_gguf(path: str | None) -> bool:
    return bool(path) and str(path).endswith(".gguf")


def external_inputs(spec) -> dict:
    """What a fine-tuning spec reads besides its config, for its config hash: an external base (a
    GGUF file's content hash, a directory's file names, sizes and modification times: LoRA
    checkpoints hold no base, so a base saved anew under the same name must not be resumed on) and
    an edited chat template."""
    out = {}
    if spec.base:
        p = Path(spec.base).expanduser()
        if is_gguf(spec.base) and p.is_file():  # one file: its content hash (remembered)
            out["base"] = {"path": str(p.resolve()), "sha256": file_digest(p)}
        else:
            files = (
                {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()}
                if p.is_dir()
                else {}
            )
            out["base"] = {"path": str(p.resolve()) if p.is_dir() else spec.base, "files": files}
    template = Path(spec.chat_template or "").expanduser()
    if template.is_file():  # an edited template renders different examples
        out["chat_template_text"] = template.read_text()
    return out


def local_model_dir(path_or_name: str) -> str:
    """An HF model dir for a `.gguf` file (imported once), else the argument as given."""
    return str(import_gguf(Path(path_or_name).expanduser())) if is_gguf(path_or_name) else path_or_name


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered by path, size, times and inode: a multi-GB file is hashed once
    (a copy that keeps the size and mtime still has a new ctime and inode)."""
    stat = path.stat()
    memo_path = record_path().with_name("gguf_digests.json")
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    memo = read_cache(memo_path)
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        memo[key] = h.hexdigest()
        write_cache(memo_path, memo)
    return memo[key]


def _describe(path: Path) -> tuple[str, set[str], int | None]:
    """(architecture, tensor types, qwen3's head size) from the file's header, refusing what
    transformers cannot read."""
    try:
        import gguf
    except ImportError:
        raise PipelineError(f"reading {path} needs the gguf package: pip install 'gguf>=0.10'.") from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        reader = gguf.GGUFReader(str(path))
        arch = str(reader.fields["general.architecture"].contents())
    except (ValueError, KeyError, OSError) as e:
        raise PipelineError(f"{path} is not a readable GGUF file ({first_line(e)}).") from None
    types = {t.tensor_type.name for t in reader.tensors}
    if ARCH_NAMES.get(arch, arch) not in GGUF_CONFIG_MAPPING:
        known = ", ".join(sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")))
        raise PipelineError(f"{path}: GGUF architecture {arch!r} is not one transformers can load ({known}).")
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    head_dim = int(key_length.contents()) if arch == "qwen3" and key_length is not None else None
    return arch, types, head_dim


def _usable(out: Path, digest: str) -> bool:
    """A finished import of this file by this version of the import, its files intact."""
    try:
        manifest = read_manifest(out) or {}
    except PipelineError:
        return False
    facts = manifest.get("facts") or {}
    fresh = facts.get("sha256") == digest and facts.get("import_version") == IMPORT_VERSION
    return fresh and verify_files(out, manifest.get("files", {})) is None


def import_gguf(path: Path) -> Path:
    """The cached HF directory for a GGUF file, built on first use. Every process of a launch
    may ask at once: one imports under a lock, the others wait and reuse it."""
    if not path.is_file():
        raise PipelineError(f"GGUF file {path} does not exist; check the path.")
    digest = file_digest(path)
    out = record_path().parent / "gguf" / f"{path.stem}-{digest[:16]}"
    if _usable(out, digest):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(out, digest):  # another process imported it while this one waited
            return out
        arch, types, head_dim = _describe(path)
        log.info("gguf: importing %s (%s, %s) into %s, once", path, arch, ", ".join(sorted(types)), out)
        for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a killed import (the lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        try:
            facts = _write_hf_dir(path, tmp, head_dim)
            facts |= {"source": str(path.resolve()), "sha256": digest, "architecture": arch}
            facts |= {"tensor_types": sorted(types), "import_version": IMPORT_VERSION}
            write_json_atomic(tmp / MANIFEST, build_manifest("gguf_import", {"source": str(path)}, {}, facts, tmp))
            replace_dir(tmp, out)
        except (NotImplementedError, ValueError, KeyError, RuntimeError) as e:
            raise PipelineError(
                f"{path} could not be imported ({first_line(e)}; architecture {arch}, tensor types "
                f"{', '.join(sorted(types))}); a type the gguf package cannot dequantize, or weights that do not "
                "fit the architecture's shapes."
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_hf_dir(path: Path, out: Path, head_dim: int | None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.tokenizer import end_of_turn, stops_at_end_of_turn

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    config = AutoConfig.from_pretrained(**where)
    if head_dim:  # transformers' reader leaves qwen3's attention.key_length out (and assumes 128)
        config.head_dim = head_dim
    tokenizer = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=torch.float32)
    with torch.device("meta"):  # no second, randomly initialised copy: the loaded tensors are taken
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # not flagged quantized: saves
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    del loaded
    stops_at_end_of_turn(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "chat_template": bool(tokenizer.chat_template),
        "end_of_turn": end_of_turn(tokenizer),
    }
