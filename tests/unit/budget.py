"""How many examples the property tests draw. Each run draws the same ones (derandomized), so
a CI run repeats what the last one proved; QI_FUZZ_SCALE=K draws K times as many, new ones
(a deep run: `QI_FUZZ_SCALE=20 .venv/bin/python -m pytest tests/unit`)."""

import os

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("QI_FUZZ_SCALE", "1"))


def examples(n: int, **kw) -> settings:
    """settings for n examples (n * QI_FUZZ_SCALE), fixed unless scaled."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.data_too_large], **kw)
