"""Expert usage and pruning: profiles, selection, slim writers, merge-back and reports."""
