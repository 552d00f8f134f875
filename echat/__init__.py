"""echat-forge: empathetic spoken-dialogue corpora and OSUM-EChat models."""

__version__ = "0.1.0"
