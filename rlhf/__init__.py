"""rlhf: take a local language model through RLHF with PPO and hand it back to Ollama."""

__version__ = "0.1.0"
