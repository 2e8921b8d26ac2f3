"""The package's version, in a module of its own: `batch.attempts` puts it in the
User-Agent, and importing it from `batch` itself would make the package a node of the
import graph (and the lazy library call a circle)."""

__version__ = "0.1.0"
