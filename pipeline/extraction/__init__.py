"""Extraction, model + manifest -> lake, behind ``vlatlas extract`` and the app's live examples.

One module a subject, imported in this order (none imports one after it):
``spec`` (the run specification) -> ``plan`` (chunks and batches, resume) -> ``inputs`` (read,
validate, encode) -> ``keep`` and ``sink`` (the device side) -> ``outputs`` -> ``rows`` (every
table's Arrow rows) -> ``chunk`` (the chunk function, the write stage) -> ``executor`` (local or
Ray) -> ``run`` (the driver: :func:`pipeline.extraction.run.extract`).
"""
