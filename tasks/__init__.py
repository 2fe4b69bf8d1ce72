"""Distillery's stages: one thin script per DVC stage (`python -m tasks.<stage>`), plus `paths`, the one list of project paths."""
