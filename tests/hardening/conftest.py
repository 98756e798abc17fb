"""Hypothesis profiles for the hardening tests.

T2T_HYPOTHESIS_PROFILE picks one (default "t2t-full"):
  t2t-full     the default: >= 500 generated cases per op (see EXAMPLES in hardening_utils.py), derandomized, so
               every run explores the same cases and a failure reruns as it is.
  t2t-ci       a quarter of the cases, for a quick check.
  t2t-explore  ten times the cases with a fresh random seed per run: to hunt for new failures. Hypothesis prints the
               failing example and an @reproduce_failure blob; each case carries its own tensor seed, so the printed
               case reruns on its own (hardening_utils.check_* functions).
Every profile prints the reproduce blob and keeps no example database (nothing is written to the tree).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# max_examples here is the scale of the per-backend budgets (hardening_utils.examples_for)
settings.register_profile("t2t-full", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("t2t-ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("t2t-explore", max_examples=1000, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("T2T_HYPOTHESIS_PROFILE", "t2t-full"))


def pytest_report_header(config):
    return f"hypothesis profile for tests/hardening: {settings.default!r}".replace("settings(", "(")[:300]


def pytest_terminal_summary(terminalreporter):
    from hardening_utils import CASE_COUNTS

    if CASE_COUNTS:
        terminalreporter.section("hypothesis cases run (incl. shrinking)")
        for test_id, count in sorted(CASE_COUNTS.items()):
            terminalreporter.write_line(f"{count:6d}  {test_id}")


@pytest.fixture
def single_intraop_thread():
    """The fuzz tests run torch (and the C++ kernels' parallel_for) on one thread: thousands of tiny calls, where on a
    busy 2-core machine two OpenMP threads spin against each other and run ~100x slower. The multi-threaded paths
    are fuzzed at larger shapes in test_threads_memory.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def intraop_threads():
    """At least two intra-op threads (restored after the test): the C++ kernels' parallel paths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield torch.get_num_threads()
    torch.set_num_threads(threads)
