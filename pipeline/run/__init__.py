"""Running steps: the runner, the manifest and the layout of a results folder."""
