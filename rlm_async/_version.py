"""The package version: one place, read by `rlm_async.__version__`, `rlm-async --version` and
the build (pyproject.toml's dynamic version)."""

__version__ = "0.1.0"
