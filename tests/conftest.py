"""Shared fixtures. Kernel fixtures live in kernel_fixtures.py, the real-libvirt lab in
lab_fixtures.py; both are imported here so every test module sees them.

Tests that need the kernel or libvirt never skip: on a machine where they cannot run, they
fail, so CI can never pass without having exercised them.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kernel_fixtures import *  # noqa: E402,F401,F403
from lab_fixtures import *  # noqa: E402,F401,F403
