"""Suite-wide test settings."""

from hypothesis import HealthCheck, settings

# Property tests check correctness, not speed: on a shared, loaded CI machine a single example
# can take longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile("fleetfl", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fleetfl")
