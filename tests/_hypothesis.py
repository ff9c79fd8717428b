"""Hypothesis settings of the property-based tests: a bounded number of examples so CI stays fast, more on
request (``pytest --slow`` or ``FUSEDTRAIN_SLOW=1``).

Import this module before using ``hypothesis.given``: it registers and loads the profile. No example
database is written (runs are reproducible from the printed seed, ``--hypothesis-seed``), and there is
no deadline (the first example of a test pays for torch's lazy initialization).
"""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis (test extras)")
from hypothesis import HealthCheck, settings  # noqa: E402

SLOW = os.environ.get("FUSEDTRAIN_SLOW", "0") not in ("", "0")

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fusedtrain", max_examples=25, **_COMMON)
settings.register_profile("fusedtrain-slow", max_examples=400, **_COMMON)
settings.load_profile("fusedtrain-slow" if SLOW else "fusedtrain")
