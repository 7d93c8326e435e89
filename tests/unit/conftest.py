"""The unit tests run beside the integration tests (scripts/test, at nice 10): no example has a
deadline there, where a wall-clock limit would measure the machine's load, not the code."""

from hypothesis import settings

settings.register_profile("qintrospect", deadline=None)
settings.load_profile("qintrospect")
