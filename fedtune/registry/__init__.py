"""Adapter artifacts for users: publish, sign, verify, promote, roll back, serve, pull.

The library half of ``fedtune registry`` / ``fedtune device``. Never imports flwr; the HTTP pieces
(FastAPI, uvicorn, httpx) are imported only by service.py and device.py when used.
"""

from fedtune.registry.errors import (DeadlineError, ExpiredError, InputError, IntegrityError, ManifestError,
                                     NotFoundError, RegistryError, ReplayError, SignatureError)
from fedtune.registry.manifest import Manifest, SignedManifest
from fedtune.registry.metadata import ChannelMeta, RootMeta, load_anchor
from fedtune.registry.publish import base_model_ref, publish_run
from fedtune.registry.registry import ArtifactInfo, Registry
from fedtune.registry.rollout import in_rollout, rollout_bucket
from fedtune.registry.signing import (SigningKey, VerifyKey, generate_keypair, load_signing_key, load_verify_key,
                                      sign_manifest, verify_manifest)

__all__ = [
    "ChannelMeta", "DeadlineError", "ExpiredError", "InputError", "ReplayError", "RootMeta", "load_anchor",
    "ArtifactInfo", "IntegrityError", "Manifest", "ManifestError", "NotFoundError", "Registry", "RegistryError",
    "SignatureError", "SignedManifest", "SigningKey", "VerifyKey", "base_model_ref", "generate_keypair",
    "in_rollout", "load_signing_key", "load_verify_key", "publish_run", "rollout_bucket", "sign_manifest",
    "verify_manifest",
]
