"""Hypothesis settings shared by the chat property tests (test_*_props.py).

The default run is short so the suite stays fast; `SMOLLCHAT_PROPS=2000 pytest tests/chat -k props`
runs each property that many times.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("SMOLLCHAT_PROPS", "15"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                 stateful_step_count=25)
