"""matplotlib, loaded on first use with a file backend: plots are written, never shown, and the
import costs most of a second that `squeeze plan` and `status` should not pay."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
