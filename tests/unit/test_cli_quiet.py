"""The CLI's in-process commands silence the known library notes, and only those, and only while they run."""

import logging
import warnings

from fedtune.cli_quiet import quiet_libraries


def test_known_notes_are_silenced_inside_and_others_are_not():
    level = logging.getLogger("bitsandbytes").level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning)
            warnings.warn("a warning fedtune's user must see", UserWarning)
            assert logging.getLogger("bitsandbytes").level == logging.ERROR
        warnings.warn("Secure RNG turned off again", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning fedtune's user must see", "Secure RNG turned off again"]
    assert logging.getLogger("bitsandbytes").level == level  # restored
