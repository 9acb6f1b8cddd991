"""Library chatter kept off the console where fedtune itself trains or evaluates in the CLI's process.

Flower's actors keep these warnings in their logs; a command that trains here (``simulate --backend
inprocess``, ``evaluate``) would otherwise print them to the person running it. Only known, harmless
messages are silenced: opacus' note on its non-secure RNG (fedtune draws its own noise; docs/privacy.md),
torch's full-backward-hook note on a frozen embedding, transformers' renamed checkpointing attribute,
bitsandbytes' optional CPU kernels and torch's pytree registration notice.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

_MESSAGES = ("Secure RNG turned off", "Full backward hook is firing", ".*is_gradient_checkpointing")
_LOGGERS = ("bitsandbytes", "torch.utils._pytree")


@contextmanager
def quiet_libraries():
    with warnings.catch_warnings():
        for message in _MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        levels = {name: logging.getLogger(name).level for name in _LOGGERS}
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
