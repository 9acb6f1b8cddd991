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


class InputError(RegistryError):
    """Bad user input (a path, an option): the CLI answers with one line and exit code 2."""


class ReplayError(RegistryError):
    """Metadata older than (or conflicting with) what this device already saw, or meant for another
    channel, base model or artifact: a replay or a mix-up, refused."""


class ExpiredError(RegistryError):
    """Signed metadata past its expiry: the registry stopped vouching for it (a frozen or stale server)."""


class DeadlineError(RegistryError):
    """A pull that did not finish within its overall deadline (a slow or trickling server)."""
