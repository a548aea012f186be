"""The run's configuration: Hydra composition of conf/ + a recipe + overrides (compose.py), and
every spec dataclass, built and checked before any stage runs (data, model, train, run).
Nothing here imports torch, so a config typo is refused in well under a second."""
