"""Exception hierarchy shared by every subpackage.

One base class lets services catch "anything we raised on purpose" and log it as a
rejection, while genuine bugs still surface as other exceptions.
"""


class CipherTwinError(Exception):
    """Base of every error ciphertwin raises deliberately."""


class ValidationError(CipherTwinError):
    """Input (bytes, message, file, argument) failed schema, size or range checks."""
