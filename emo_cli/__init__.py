"""emo: profile, prune, export and run slim task-specific models from one EMO mixture of experts."""

__version__ = "0.1.0"
