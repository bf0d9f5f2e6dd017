"""The eval stage's helpers: generation scores."""
