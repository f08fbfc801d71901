"""The pipeline's stages: each declares its steps (inputs, outputs, recipe values) and glues the
layers below; registry.py lists them in run order."""
