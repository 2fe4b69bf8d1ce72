"""Plumbing the pipeline's stages share: errors, atomic files and checkpoints, params, resume
state, MLflow tracking, plots. Imports no algorithm; only `tracking` imports MLflow."""
