"""Documents from user data: readers, token batches, held-out split, multiple-choice items."""
