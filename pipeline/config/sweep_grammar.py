"""Hydra's sweep grammar (`k=a,b`, `choice()`, `range()`, `glob()`) expanded into the override
lists of a sweep's combinations (`pipeline -m`)."""

from __future__ import annotations

from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from pipeline.errors import PipelineError, first_line

SWEPT_NEVER = ("run.", "sweep.", "stage")  # these name the sweep itself; the same for every run


class _GroupOptions:
    """What Hydra's glob() sweep asks of a config loader: the options of a config group."""

    def __init__(self, conf_dir: Path):
        self.conf_dir = conf_dir

    def get_group_options(self, group: str, results_filter=None, config_name=None, overrides=None) -> list[str]:
        return sorted(p.stem for p in (self.conf_dir / group).glob("*.yaml"))


def expand(overrides: list[str], conf_dir: Path) -> tuple[list[list[str]], list[str]]:
    """(the combinations as override lists, the swept keys) of Hydra's sweep grammar:
    `k=a,b`, `k=choice(a,b)`, `k=range(1,4)`, `group=glob(pattern)`."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        for o in parsed:
            o.config_loader = _GroupOptions(conf_dir)
        swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
        bad = [k for k in swept if k.lstrip("+~").startswith(SWEPT_NEVER)]
        if bad:
            raise PipelineError(
                f"{bad[0]} cannot be swept: the sweep's run dirs and stages are the same for every run."
            )
        (combinations,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:
        raise PipelineError(f"sweep: {first_line(e)}") from None
    if not combinations:
        raise PipelineError(f"the sweep {' '.join(overrides)} has no combinations (a glob that matches no option?).")
    return combinations, swept
