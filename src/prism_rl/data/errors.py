"""The data errors every reader raises (re-exported by :mod:`prism_rl.data.records`).

Their own module so that the image decoder (:mod:`prism_rl.data.images`) and the records
module can both raise them without importing each other.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and the record index (and field)."""


class BadField(DataError):
    """One record's problem in one field, raised while the record is parsed, before the
    reader attaches the file and record index (see :func:`prism_rl.data.records.report_bad`)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"field '{field}': {why}")
        self.field = field
        self.why = why
