"""SpectralAR: nested spectral tokenization and spectral autoregressive generation.

The Python API (``spectralar.api``) is exported here lazily: ``import spectralar`` stays light
(no torch), so the CLI's ``--help`` and light stages start fast; the first use of a name below
imports the API, and torch with it::

    import spectralar
    codec = spectralar.load_codec("models/tokenizer")
"""

__version__ = "0.1.0"

# Names served by spectralar.api on first use (PEP 562 module __getattr__).
_API = ("Codec", "Generator", "load_codec", "load_generator", "load_images", "generate", "save_png")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from spectralar import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'spectralar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
