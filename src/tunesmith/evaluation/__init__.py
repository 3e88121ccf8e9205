"""Evaluation: score a fine-tuned run against its base model and say whether the difference is real."""
