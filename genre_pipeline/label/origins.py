"""Where each of a night's label rows came from, in columns the night carries until its write tasks count them.

Apart from sink.py (which imports pyiceberg) so that the Ray Data tasks and the labeller actors that set them
do not import it.
"""

from __future__ import annotations

# Where each label row came from: scored tonight, a scored row this night's killed run left in staging, or
# carried over unchanged from the previous night. Not a table column: the sink counts and drops it.
ORIGIN_COLUMN = "origin"
ORIGIN_SCORED, ORIGIN_RESUMED, ORIGIN_CARRIED = "scored", "resumed", "carried"
ORIGINS = (ORIGIN_SCORED, ORIGIN_RESUMED, ORIGIN_CARRIED)
# Whether the movie had a row in the previous night (how many of those rows the night keeps: the shrink guard).
IN_PREVIOUS_COLUMN = "in_previous"
