"""Helpers of `python -m stages.report`: terminal tables (table.py) and DVC's experiment records (experiments.py)."""
