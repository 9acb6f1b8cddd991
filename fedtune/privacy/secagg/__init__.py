"""Secure aggregation (SecAgg+, Bell et al. 2020), Flower-free: the server learns only the sum of a cohort's
updates. ``client``/``server`` hold each party's protocol state, ``messages`` what they exchange, ``driver``
runs a round in process; ``field`` quantizes floats into the ring the masks live in; ``crypto`` and
``shamir`` are the primitives (``cryptography``'s X25519, HKDF, AES-GCM, AES-CTR; Shamir over GF(2^521-1));
``identity`` signs and verifies the key adverts with registered ed25519 identity keys (against a server that
substitutes keys).
"""

from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.driver import Dropouts, SecAggOutcome, StageCost, make_setup, run_secure_aggregation
from fedtune.privacy.secagg.field import FieldQuantizer
from fedtune.privacy.secagg.identity import (
    AdvertAuth,
    AuthenticatedClient,
    DeviceIdentity,
    IdentityRegistry,
    SignedKeyAdvert,
)
from fedtune.privacy.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    SealedShare,
    SecAggAbort,
    SecAggSetup,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.privacy.secagg.server import SecAggServer

__all__ = [
    "AdvertAuth",
    "AuthenticatedClient",
    "DeviceIdentity",
    "Dropouts",
    "FieldQuantizer",
    "IdentityRegistry",
    "KeyAdvert",
    "MaskedInput",
    "SealedShare",
    "SecAggAbort",
    "SecAggClient",
    "SecAggOutcome",
    "SecAggServer",
    "SecAggSetup",
    "SignedKeyAdvert",
    "StageCost",
    "UnmaskReply",
    "UnmaskRequest",
    "make_setup",
    "run_secure_aggregation",
]
