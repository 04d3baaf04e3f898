"""Memory sampling for the memory-contract test and scripts/bench-memory.

Reads /proc: a process's RssAnon / RssFile / VmRSS and the system's Cached, in MiB.
"""
import os
import threading
import time

MIB = 1 << 20


def drop_file_cache(path):
    """Evicts |path| from the page cache, so that a measurement starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def pss_file(pid):
    """Proportional share of file-backed pages: pages several readers map count once in sum."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_File:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def system_cached():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Samples reader processes, the daemon and the system every |interval| seconds."""

    def __init__(self, daemon_pid, interval=0.01):
        self.daemon_pid = daemon_pid
        self.interval = interval
        self.readers = []
        self.samples = []  # (t, reader RssAnon sum, reader RssFile sum, daemon VmRSS, Cached, reader Pss_File sum)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add_reader(self, pid):
        self.readers.append(pid)

    def start(self):
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            anon = file = pss = 0
            for pid in list(self.readers):
                st = proc_status(pid)
                anon += st.get("RssAnon", 0)
                file += st.get("RssFile", 0)
                if len(self.readers) > 1:
                    pss += pss_file(pid)
            daemon = proc_status(self.daemon_pid).get("VmRSS", 0) if self.daemon_pid else 0
            self.samples.append((time.monotonic() - self.t0, anon, file, daemon, system_cached(), pss))
            time.sleep(self.interval)
