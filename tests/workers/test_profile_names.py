"""An unknown worker profile is refused with every profile there is, `fast` included."""

from __future__ import annotations

import pytest

from taskyard import ConfigurationError
from taskyard.config import load_settings
from taskyard.workers.profiles import get_profile


def test_an_unknown_profile_lists_every_profile() -> None:
    with pytest.raises(ConfigurationError) as caught:
        get_profile(load_settings(), "nope")
    assert str(caught.value) == (
        "unknown worker profile 'nope'; known profiles: all, batch, critical, default, fast"
    )
