"""Sampling: how tokens are drawn when generating (greedy at temperature 0)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise PipelineError(f"generate.max_new_tokens={self.max_new_tokens} must be a positive number.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise PipelineError(f"generate.temperature={self.temperature} must be >= 0 (0 = greedy) and "
                                f"generate.top_p={self.top_p} in (0, 1].")

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kw
