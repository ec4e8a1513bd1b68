"""Errors of the diagnostics: each says what was wrong with the request."""

from vlm.errors import VLMError


class DiagnosticError(VLMError):
    """A diagnostic request that cannot be run as asked (bad window, layer, phrase, case file...)."""


class ReplacementError(DiagnosticError):
    """No replacement phrase for the constraint encodes to the same number of tokens."""
