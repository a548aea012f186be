"""The stage contract: what every module in pipeline/stages/ defines for `pipeline.runner` to run it
(tests/test_stage_contract.py checks each stage against it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config.run import RunSpecs
    from pipeline.stages.context import StageContext


TRAINING_WORK = ("checkpoints", "wandb", "tensorboard")  # a training stage's UNTRACKED: work, not artifact


@runtime_checkable
class Stage(Protocol):
    NAME: str  # the stage's name, as in stage=NAME
    DIR: str  # its artifact folder under the run dir
    DISTRIBUTED: bool  # every rank runs it, else only the main process
    KEEPS_WORK: bool  # an interrupted build keeps its work (e.g. checkpoints) for the next run to resume
    UNTRACKED: tuple[str, ...]  # folders of the artifact the manifest does not checksum

    def upstream(self, specs: RunSpecs) -> list[str]:
        """The stages whose artifacts this one reads, given the run's specs."""
        ...

    def config_slice(self, specs: RunSpecs) -> dict:
        """The part of the config that decides this stage's artifact (a change rebuilds it)."""
        ...

    def run(self, ctx: StageContext) -> dict:
        """Build the artifact into ctx.out; return the facts its manifest records."""
        ...
