"""Distillery's stages (one module per DVC stage) and the plumbing they share."""
