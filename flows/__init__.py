"""Prefect flows over the DVC stages, and the `distillery` command line."""
