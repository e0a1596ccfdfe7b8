"""Finetuning and what emo's training loops share."""
