"""Model-independent half of ``layerdecode eval``: tasks, results store and statistics."""
