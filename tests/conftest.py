"""Configuration shared by every test."""

import os

from hypothesis import settings

# In CI (`CI=true`), the property tests draw the same examples on every run, so that whether a
# submission lands does not depend on the draw; development runs explore fresh examples (and
# `--hypothesis-seed=N` replays a draw).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
