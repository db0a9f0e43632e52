"""The user-facing entry point."""
from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """`LLM(model_dir, **config)`; see `nanovllm.config.Config` for the keyword arguments."""
