"""SpectralAR: nested spectral tokenization and spectral autoregressive generation."""

__version__ = "0.1.0"
