"""The profile store's errors: a caller that is not the user, a record that fails authentication,
and a master key that does not open the database.
"""

from __future__ import annotations


class AccessDenied(PermissionError):
    """The caller did not prove to be the user: unknown user, or missing or wrong token."""


class TamperedRecordError(ValueError):
    """A stored ciphertext failed authentication: modified, moved between rows, or under another key."""


class MasterKeyMismatch(ValueError):
    """The master key given does not open this database."""
