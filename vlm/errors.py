"""Errors of the model access layer. Every message says what was wrong and what to do."""


class VLMError(Exception):
    """Base class: a request the model layer cannot serve, with a readable message."""


class ModelLoadError(VLMError):
    """The folder is missing, is not a Hugging Face checkpoint, or is not of a supported family."""


class ImageDecodeError(VLMError):
    """The image bytes or file cannot be decoded as an image."""


class PromptError(VLMError):
    """A prompt cannot be encoded (empty question, missing constraint, too long...)."""


class ConstraintNotFoundError(PromptError):
    """The constraint text does not occur in the question."""
