"""Integrations with data-processing frameworks. Each is imported on its own
(`from nanovllm.integrations.ray import LLMPredictor`); importing this package, or
`nanovllm`, imports none of their dependencies."""
