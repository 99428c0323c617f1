"""token-journey: sparse autoencoders for every layer, and a sentence's journey through a model."""

__version__ = "0.1.0"
