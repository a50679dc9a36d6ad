"""cProfile of a stretch of one thread, saved for reading later (KILN_PROFILE_DIR, benchmarks).

`start()` returns a running profile of the calling thread; `write(profile, stem)` stops it and
writes `stem.prof` (pstats, for snakeviz or pstats.Stats) and `stem.txt` (the top functions by
cumulative and by own time).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats


def start() -> cProfile.Profile:
    """A running profile of this thread. Raises ValueError (Python 3.12+) when another
    profiler already holds it."""
    profile = cProfile.Profile()
    profile.enable()
    return profile


def write(profile: cProfile.Profile, stem: str) -> None:
    """Stop `profile`; write stem.prof and stem.txt, making stem's directory if needed."""
    profile.disable()
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    profile.dump_stats(stem + ".prof")
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(80)
    stats.sort_stats("tottime").print_stats(40)
    with open(stem + ".txt", "w") as f:
        f.write(text.getvalue())
