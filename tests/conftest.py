import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized (same examples every run) and no deadline (2 shared cores are noisy).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
# Local exploration: random seeds, more examples; failures found here become @example(...) cases.
settings.register_profile("explore", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _cwd_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Subprocesses (``python -m minipissa``, ``python -c``) put their working directory first on sys.path: run
    them from a temporary one, so that they import the package as installed, as users do, not the checkout."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)
