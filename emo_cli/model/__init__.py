"""An HF checkpoint as a model: resolution, mapped weights, memory plan, streaming, passes, tokens."""
