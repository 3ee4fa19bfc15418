"""Stands in for a Colab runtime: its kernels have ``google.colab`` imported at start-up."""

import google.colab  # noqa: F401
