"""nanovllm: a small, fast offline LLM inference engine."""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # NOTE: imported on first use, so that `python -m nanovllm.batch --help` (which imports this
    # package first) answers without importing torch
    if name == "LLM":
        from nanovllm.llm import LLM
        return LLM
    if name == "SamplingParams":
        from nanovllm.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
