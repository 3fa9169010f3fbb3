"""The package version, apart from afd/__init__.py so that any module can name it without
importing the facade (which reaches the whole engine)."""

__version__ = "0.1.0"
