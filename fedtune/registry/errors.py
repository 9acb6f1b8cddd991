"""Errors of the registry and the device client. Each says what was expected, what came, how to fix it."""


class RegistryError(Exception):
    """Base class: anything the registry or a device refuses."""


class ManifestError(RegistryError):
    """A manifest that does not parse or does not fit (wrong base model, unsafe path)."""


class SignatureError(RegistryError):
    """A manifest whose signature does not verify with the trusted public key."""


class IntegrityError(RegistryError):
    """A file whose sha256 or size differs from the signed manifest."""


class NotFoundError(RegistryError):
    """An unknown version, channel or blob."""
