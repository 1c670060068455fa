"""The package version, in one place (pyproject.toml reads it; ``logo.__version__`` and
``logo_kernels.__version__`` are this)."""
__version__ = "0.2.0"
