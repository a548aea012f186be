"""Versions the code relies on, checked at start with the fix in one line (a too-old package
would otherwise misbehave silently: before transformers 4.54 packed sequences attend to each
other, and before 4.56 `dtype=` in from_pretrained is ignored)."""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

from pipeline.errors import PipelineError

MINIMUM = {"transformers": "4.56"}  # keep in step with pyproject.toml


def check_versions(installed=metadata.version) -> None:
    for package, minimum in MINIMUM.items():
        have = installed(package)
        if Version(have) < Version(minimum):
            raise PipelineError(
                f"{package} {have} is installed but pipeline needs {minimum} or later; "
                f"run: pip install -U '{package}>={minimum}'"
            )
