"""The stages. Each module has NAME, upstream(specs), config_slice(specs) and run(ctx) -> facts;
`pipeline.runner` decides when to run them, and no stage imports another."""
