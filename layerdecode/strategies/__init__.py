"""The built-in strategies, one module each. They register through entry points."""
