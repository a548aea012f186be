"""The stages. Each module defines what `pipeline.stages.base.Stage` lists (NAME, DIR, DISTRIBUTED,
KEEPS_WORK, UNTRACKED, upstream(specs), config_slice(specs), run(ctx) -> facts); `pipeline.runner`
decides when to run them, and no stage imports another."""
