"""LongRoPE2: extend the context window of RoPE LLMs."""
__version__ = "0.1.0"
