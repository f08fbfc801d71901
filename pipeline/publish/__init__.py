"""`squeeze publish`: what a finished run puts on a Hugging Face model repo (publish_run.py, which
asks the stages whether the run is current) and the upload itself (hub_upload.py, through the hub
session pipeline.sources.hub opens). Only the CLI uses it."""
