import json

import pytest

from pipeline.artifacts import (
    MANIFEST,
    Artifact,
    artifact_state,
    build_manifest,
    canonical_hash,
    load_artifact,
    write_json_atomic,
)
from pipeline.errors import PipelineError


def publish(root, config, inputs=None, files=None):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"a.txt": "hello"}).items():
        (root / name).write_text(text)
    manifest = build_manifest("s", config, inputs or {}, {"n": 1}, root)
    write_json_atomic(root / MANIFEST, manifest)
    return Artifact("s", root, manifest)


def test_states_missing_incomplete_complete_stale(tmp_path):
    cfg = {"x": 1}
    d = tmp_path / "s"
    assert artifact_state(d, canonical_hash(cfg), {}) == "missing"
    d.mkdir()
    assert artifact_state(d, canonical_hash(cfg), {}) == "incomplete"
    publish(d, cfg)
    assert artifact_state(d, canonical_hash(cfg), {}) == "complete"
    assert artifact_state(d, canonical_hash({"x": 2}), {}) == "stale"


def test_changed_upstream_makes_downstream_stale(tmp_path):
    up = publish(tmp_path / "up", {"u": 1})
    down = publish(tmp_path / "down", {"d": 1}, inputs={"up": up})
    assert artifact_state(down.path, canonical_hash({"d": 1}), {"up": up}) == "complete"
    same = publish(tmp_path / "up", {"u": 1})  # an identical rebuild keeps downstream valid
    assert artifact_state(down.path, canonical_hash({"d": 1}), {"up": same}) == "complete"
    changed = publish(tmp_path / "up", {"u": 1}, files={"a.txt": "new content"})
    assert artifact_state(down.path, canonical_hash({"d": 1}), {"up": changed}) == "stale"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_files_are_refused(tmp_path, damage):
    art = publish(tmp_path / "s", {"x": 1}, files={"w.bin": "0123456789"})
    f = art.path / "w.bin"
    if damage == "truncate":
        f.write_text("01234")
    elif damage == "flip":
        f.write_text("0123456780")
    else:
        f.unlink()
    with pytest.raises(PipelineError, match="is corrupt: w.bin"):
        artifact_state(art.path, canonical_hash({"x": 1}), {})
    with pytest.raises(PipelineError, match="force=true"):
        load_artifact(art.path, "s", "rerun")


def test_unparsable_manifest_is_refused(tmp_path):
    art = publish(tmp_path / "s", {"x": 1})
    (art.path / MANIFEST).write_text("{not json")
    with pytest.raises(PipelineError, match="manifest.json is corrupt"):
        artifact_state(art.path, canonical_hash({"x": 1}), {})


def test_manifest_records_contract_fields(tmp_path):
    art = publish(tmp_path / "s", {"x": 1})
    m = json.loads((art.path / MANIFEST).read_text())
    for key in ("stage", "status", "created", "config", "config_hash", "inputs", "facts", "files", "versions"):
        assert key in m
    assert m["files"]["a.txt"]["size"] == 5 and "torch" in m["versions"]
