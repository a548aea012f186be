"""Every stage the runner knows defines the whole stage contract (pipeline/stages/base.py), with
the right types, under the name it is registered as."""

import pytest

from pipeline.runner import STAGES
from pipeline.stages.base import Stage


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_module_satisfies_the_stage_contract(name):
    stage = STAGES[name]
    assert isinstance(stage, Stage), f"{stage.__name__} lacks part of the Stage contract"
    assert stage.NAME == name
    assert isinstance(stage.DIR, str) and stage.DIR
    assert type(stage.DISTRIBUTED) is bool and type(stage.KEEPS_WORK) is bool
    assert isinstance(stage.UNTRACKED, tuple) and all(isinstance(d, str) for d in stage.UNTRACKED)
    assert all(callable(f) for f in (stage.upstream, stage.config_slice, stage.run))
