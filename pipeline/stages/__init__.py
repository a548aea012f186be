"""The stages in chain order. Each module has NAME, upstream(cfg), config_slice(cfg) and
run(cfg, inputs, out) -> facts; `pipeline.runner` decides when to run them."""

from pipeline.stages import finetune, generate, prepare, pretrain, tokenizer

STAGES = {m.NAME: m for m in (tokenizer, prepare, pretrain, finetune, generate)}
ORDER = list(STAGES)
