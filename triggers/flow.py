"""``triggers.flow`` is :mod:`triggers.contrib.flow` (the Eventor-style flow API)."""

import sys

from triggers.contrib import flow

sys.modules[__name__] = flow
