"""Run directory layout, stage manifests, atomic publishing and up-to-date checks.

An artifact is a directory `<run>/<stage>/` holding the stage's files and a `manifest.json`
written last. It is built in a sibling temp dir and renamed into place, so a crash never
leaves a half-written artifact under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
# Files above this size are checked by size only on every use; hashing GBs of shards each
# time a stage is considered would make "up to date" slow.
FULL_HASH_LIMIT = 64 * 2**20
_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "hydra-core")


@dataclass
class Artifact:
    stage: str
    path: Path
    manifest: dict

    @property
    def facts(self) -> dict:
        return self.manifest.get("facts", {})

    @property
    def hash(self) -> str:
        return manifest_hash(self.manifest)


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_hash(manifest: dict) -> str:
    """Identity of an artifact's content: a rebuild that gives the same files keeps downstream valid."""
    return canonical_hash({k: manifest.get(k) for k in ("stage", "config_hash", "inputs", "files")})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_files(root: Path, untracked: tuple[str, ...] = (), hash_limit: float = float("inf")) -> dict:
    """{relative path: {"size", "sha256"}} for the artifact's files (not the manifest, not
    work folders such as checkpoints/ that change after publishing); files above `hash_limit`
    bytes get no sha256 (where only the size will be checked, as verify_files does above
    FULL_HASH_LIMIT)."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.name != MANIFEST and rel.parts[0] not in untracked and not rel.parts[0].startswith("."):
            size = p.stat().st_size
            files[rel.as_posix()] = {"size": size, "sha256": file_sha256(p) if size <= hash_limit else None}
    return files


def verify_files(root: Path, files: dict) -> str | None:
    """Return why the artifact's files disagree with its manifest, or None if they agree."""
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != info["size"]:
            return f"{rel} has {size} bytes, the manifest says {info['size']}"
        if size <= FULL_HASH_LIMIT and info["sha256"] is not None and file_sha256(p) != info["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(
            f"{path} is corrupt ({e}); delete {stage_dir} or rerun with force=true to rebuild it."
        ) from None


def _check_intact(stage_dir: Path, manifest: dict) -> None:
    problem = verify_files(stage_dir, manifest.get("files", {}))
    if problem:
        raise PipelineError(f"{stage_dir} is corrupt: {problem}; delete it or rerun with force=true to rebuild it.")


def load_artifact(stage_dir: Path, stage: str, hint: str) -> Artifact:
    """Load a complete, intact artifact or raise an error naming the fix (`hint`)."""
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "complete":
        raise PipelineError(f"{stage_dir} has no complete {stage} artifact; {hint}.")
    _check_intact(stage_dir, manifest)
    return Artifact(stage, stage_dir, manifest)


def artifact_state(stage_dir: Path, config_hash: str, inputs: dict[str, Artifact]) -> str:
    """'missing', 'incomplete', 'stale' or 'complete'; raises PipelineError if corrupt."""
    if not stage_dir.exists():
        return "missing"
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "complete":
        return "incomplete"
    _check_intact(stage_dir, manifest)
    if manifest.get("config_hash") != config_hash:
        return "stale"
    recorded = {name: i.get("manifest_hash") for name, i in manifest.get("inputs", {}).items()}
    if recorded != {name: a.hash for name, a in inputs.items()}:
        return "stale"
    return "complete"


def check_lineage(tokenizer, tok: Artifact, data: Artifact) -> int:
    """The shards must come from this tokenizer, and every size must agree; returns the vocab size."""
    if data.manifest["inputs"].get("tokenizer", {}).get("manifest_hash") != tok.hash:
        raise PipelineError(
            f"{data.path} was tokenized with another tokenizer than {tok.path}; rerun `pipeline stage=prepare`."
        )
    sizes = {
        "tokenizer": len(tokenizer),
        "shards": data.facts["vocab_size"],
        "tokenizer manifest": tok.facts["vocab_size"],
    }
    if len(set(sizes.values())) != 1:
        raise PipelineError(f"vocabulary sizes disagree ({sizes}); rebuild with `pipeline stage=prepare force=true`.")
    return len(tokenizer)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def build_manifest(
    stage: str, config: dict, inputs: dict[str, Artifact], facts: dict, root: Path, untracked: tuple[str, ...] = ()
) -> dict:
    return {
        "stage": stage,
        "status": "complete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "config_hash": canonical_hash(config),
        "inputs": {n: {"path": str(a.path), "manifest_hash": a.hash} for n, a in inputs.items()},
        "facts": facts,
        "files": list_files(root, untracked),
        "versions": package_versions(),
        "git_commit": _git_commit(),
    }


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place, replacing an older one (never a half-built one)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_dir(final: Path):
    """Yield a fresh temp dir next to `final`; it is removed unless the caller renames it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):  # left by a killed earlier attempt
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
