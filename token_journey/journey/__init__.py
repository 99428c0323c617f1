"""The token journey: a text followed number by number through a Llama or Gemma model.

Every step (tokenization, embedding, each layer's norms, projections, RoPE, attention, MLP,
residual adds, final norm, LM head, softmax) is recomputed from the weights by our own code and
compared with the model's tensor at the same point, captured by hooks. See `run_journey`.
"""

from token_journey.journey.follow import Journey, UnsupportedArchitecture, run_journey, slug
from token_journey.journey.steps import Step

__all__ = ["Journey", "Step", "UnsupportedArchitecture", "run_journey", "slug"]
