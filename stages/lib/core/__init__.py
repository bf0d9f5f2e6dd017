"""What every stage shares: the params schema, recipes, user errors and atomic outputs."""
