"""token-journey: sparse autoencoders for every layer, and a sentence's journey through a model."""

# The release, as pyproject.toml states it (tests/test_docs.py checks they agree) and CHANGELOG.md heads it.
__version__ = "0.1.0"
