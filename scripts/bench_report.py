"""Shared by the scripts/bench-* benchmarks: the machine line, the section of docs/benchmarks.md
each benchmark owns (replaced in place on every run), where a torch zip's records are, and a
mount of ckptfs to measure."""
import json
import os
import platform
import resource
import subprocess
import tempfile
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


class BenchMount:
    """ckptfs mounted on a fresh directory. foreground=True keeps the daemon a child (its pid is
    known at once, and it is waited for); otherwise ckptfs daemonizes and returns when the mount
    is ready, so mount_seconds is exactly what a user waits, and load_cpu what that process spent
    on the way (the daemon it leaves behind is not a child: its CPU is not counted)."""

    def __init__(self, binary, ckpt, *args, foreground=True):
        self.path = tempfile.mkdtemp(prefix="ckptfs-bench-")
        self.daemon = None
        start = time.monotonic()
        if foreground:
            self.daemon = subprocess.Popen([binary, "-f", *args, ckpt, self.path])
            deadline = start + 120
            while not os.path.ismount(self.path):
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    self.daemon.kill()
                    os.rmdir(self.path)
                    raise SystemExit(f"ckptfs did not mount {ckpt}")
                time.sleep(0.02)
            self.mount_seconds = time.monotonic() - start
            self.pid = self.daemon.pid
        else:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([binary, *args, ckpt, self.path], capture_output=True, text=True)
            self.mount_seconds = time.monotonic() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.load_cpu = {"user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
                             "faults": after.ru_minflt - before.ru_minflt}
            if r.returncode != 0:
                os.rmdir(self.path)
                raise SystemExit(f"ckptfs failed: {r.stderr}")
            self.pid = int(subprocess.run(["pgrep", "-o", "-f", f"ckptfs.*{self.path}"], capture_output=True,
                                          text=True).stdout.split()[0])

    def stats(self):
        with open(os.path.join(self.path, ".ckptfs/stats")) as f:
            return json.load(f)

    def prefaulted_bytes(self):
        """Waits until the daemon has backed its whole cache (it does so in the background after
        mounting) and returns how many bytes that is: RSS measured after this stays put."""
        from ckptfs_testlib import wait_prefaulted
        return wait_prefaulted(self.stats)["daemon_prefaulted_bytes"]

    def close(self):
        subprocess.run(["fusermount3", "-u", self.path], check=True)
        if self.daemon is not None:
            self.daemon.wait(timeout=30)
        else:
            for _ in range(600):
                if not os.path.exists(f"/proc/{self.pid}"):
                    break
                time.sleep(0.05)
        os.rmdir(self.path)
