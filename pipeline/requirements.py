"""The dependency floors of pyproject.toml, checked at start with the fix in one line: a too-old
package otherwise fails late or, worse, misbehaves silently (before transformers 4.54 packed
sequences attend to each other; before 4.56 `dtype=` in from_pretrained is ignored; before peft
0.15 LoRA has no trainable token rows; torch.optim.Muon, the CPU recipe's optimizer, is in torch
2.9 and later). The floors are read from the installed distribution's own metadata, so this check
and pyproject.toml cannot drift apart; CI runs the fast tests on them (.ci/floors.txt)."""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.errors import PipelineError


def floors(requires: list[str] | None = None) -> dict[str, str]:
    """{package: lowest version} of the project's unconditional dependencies ({} when pipeline
    runs from a source tree that was never installed)."""
    if requires is None:
        try:
            requires = metadata.requires("pipeline") or []
        except metadata.PackageNotFoundError:
            return {}
    out = {}
    for line in requires:
        req = Requirement(line)
        if req.marker is not None:  # extras ("; extra == 'test'") and platform-only packages
            continue
        lowest = [s.version for s in req.specifier if s.operator == ">="]
        if lowest:
            out[req.name] = lowest[0]
    return out


def check_versions(installed=metadata.version, minimum: dict[str, str] | None = None) -> None:
    for package, lowest in (floors() if minimum is None else minimum).items():
        try:
            have = installed(package)
        except metadata.PackageNotFoundError:
            raise PipelineError(f"{package} is not installed; run: pip install '{package}>={lowest}'") from None
        if Version(have).release < Version(lowest).release:  # 2.13.0+cpu satisfies 2.13
            raise PipelineError(
                f"{package} {have} is installed but pipeline needs {lowest} or later; "
                f"run: pip install -U '{package}>={lowest}'"
            )
