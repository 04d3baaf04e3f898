"""Shared by the scripts/bench-* benchmarks: the machine line and the section of
docs/benchmarks.md each benchmark owns (replaced in place on every run)."""
import os
import platform
import time

HEADER = "# Benchmarks\n\nEvery figure below comes from a script in `scripts/`; ratios are within one run.\n\n"


def machine_line():
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 30)
    return (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
            f"({os.cpu_count()} cores, {gib} GiB, kernel {platform.release()})")


def write_section(md_path, heading, section):
    """Replaces the section whose first line starts with |heading| (or appends it)."""
    text = open(md_path).read() if os.path.exists(md_path) else HEADER
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(md_path, "w") as f:
        f.write(text)
