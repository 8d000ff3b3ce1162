"""edgedistill: distil a big open-weights LLM into a small private one that runs on the edge."""

__version__ = "0.1.0"
