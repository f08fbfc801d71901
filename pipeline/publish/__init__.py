"""Publishing what a run made: uploading its files to a Hugging Face model repo (the hub
session itself, endpoint and token, is pipeline.sources.hub)."""
