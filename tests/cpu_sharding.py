"""`python tests/cpu_sharding.py ARGS` runs `python -m pipeline ARGS` with accelerate's FSDP and
DeepSpeed allowed on CPU processes; the sharded-training tests launch it.

accelerate 1.15 enables FSDP and DeepSpeed only for GPU process groups (on CPU the FSDP config
silently runs DDP). torch's FSDP2 and DeepSpeed (DS_ACCELERATOR=cpu) both work on a gloo group,
so this lifts exactly that gate and runs the real CLI: the sharded checkpoint, resume and
consolidation code then runs on a machine without GPUs.
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

import pipeline.train.strategy
from pipeline.cli import main

_partial_state_init = PartialState.__init__


def _as_gpu_group(self, *args, **kwargs):
    _partial_state_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:  # FSDP is only enabled for MULTI_GPU
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


PartialState.__init__ = _as_gpu_group
pipeline.train.strategy.has_accelerator = lambda: True  # Accelerator(cpu=False): DeepSpeed is only enabled then

if __name__ == "__main__":
    sys.exit(main())
