"""``from pipeline.extract import extract``, kept for the importers outside the extraction's files:
the extraction is the package :mod:`pipeline.extraction` (the driver: ``pipeline.extraction.run``)."""

from pipeline.extraction.run import extract  # noqa: F401
