"""Shared by the scripts/bench-* benchmarks: the machine line, the section of docs/benchmarks.md
each benchmark owns (replaced in place on every run), and where a torch zip's records are."""
import os
import platform
import time
import zipfile

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


def record_offsets(path, n):
    """Absolute offsets of data/0..n-1 (tensor i's storage is record i: the bench wrote them)."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data":
                f.seek(info.header_offset)
                h = f.read(30)
                out[int(parts[2])] = info.header_offset + 30 + int.from_bytes(h[26:28], "little") + int.from_bytes(h[28:30], "little")
    return [out[i] for i in range(n)]
