"""Kernel search: proposers (templates, llm), the generate → verify → feedback loop, the tuner."""
