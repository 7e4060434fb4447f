"""Stress runs for issue 7 (docs/reliability.md): ``python -m stress`` / ``make stress``.

The scenarios are the test modules themselves (tests/test_crash_kernel.py,
test_concurrency_kernel.py, test_fuzz_*.py, test_limits_kernel.py), run with
``BPFCG_STRESS=1`` so that each uses its long iteration counts; this package holds what they
share beyond the test helpers: the engine worker process and the XML generators.
"""
