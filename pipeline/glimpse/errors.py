"""Typed errors of the engine: callers catch these, never bare exceptions."""


class GlimpseError(Exception):
    """Base class of every error the engine raises on purpose."""


class GlimpseConfigError(GlimpseError):
    """A glimpse config or module file is malformed or unsupported."""


class ModuleMismatchError(GlimpseError):
    """Glimpse modules were built for another model (hidden size, layers, vision tower)."""


class RequestError(GlimpseError):
    """A request cannot be answered as given (no images, unreadable image, bad options)."""


class UnsupportedModelError(GlimpseError):
    """The checkpoint is of a model family no architecture adapter covers."""
