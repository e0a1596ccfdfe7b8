"""Held-out loss, multiple-choice accuracy, lm-eval tasks, and the `emo eval` flow."""
