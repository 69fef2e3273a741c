"""Test settings: the hypothesis profiles for the generated-network tests.

``ci`` (default) keeps the suite within its time; ``python -m pytest --hypothesis-profile=thorough``
checks many more generated networks.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("ci")
