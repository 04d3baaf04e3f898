"""Helpers shared by the integration tests: FUSE availability, mounting, torch ground truth.

Every expected value comes from real torch (torch.load of the same file), never from ckptfs.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time

BINARY = os.environ.get("CKPTFS_BINARY") or os.path.join(os.path.dirname(__file__), "..", "..", "build", "ckptfs")
MOUNT_TIMEOUT_S = 30


def require_fuse():
    """Fails loudly (never skips) when FUSE cannot be used: CI machines have it."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist")
    else:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as e:
            problems.append(f"/dev/fuse cannot be opened: {e}")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (apt-get install fuse3)")
    if problems:
        raise AssertionError("FUSE IS UNAVAILABLE, the mount tests cannot run: " + "; ".join(problems))
    if not os.path.exists(BINARY):
        raise AssertionError(f"ckptfs binary not found at {BINARY} (build first)")


def unescape_mount_field(field):
    """/proc/mounts writes space, tab, newline and backslash as \\ooo octal escapes."""
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path):
    """The filesystem type mounted at |path| ("fuse.ckptfs", ...), or None."""
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            _, point, fs_type = line.split()[:3]
            if unescape_mount_field(point) == path:
                return fs_type
    return None


def is_mounted(path):
    return mount_type(path) is not None


def fuse_connection(path):
    """The FUSE connection number of the mount at |path| (its device's minor, the name of its
    directory under /sys/fs/fuse/connections), read from mountinfo so that no request is sent."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape_mount_field(fields[4]) == path:
                major, minor = fields[2].split(":")
                return int(minor) if major == "0" else None
    return None


def abort_connection(conn):
    """Aborts FUSE connection |conn| through fusectl (mounted here if it is not): the one way to
    free a daemon stuck in the kernel, which not even SIGKILL ends. The last resort of a test."""
    base = "/sys/fs/fuse/connections"
    if not os.path.isdir(os.path.join(base, str(conn))):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", base], capture_output=True, timeout=30)
    try:
        with open(os.path.join(base, str(conn), "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


def unmount(path, proc=None, conn=None):
    """Unmounts |path| and reaps |proc|; falls back to a lazy unmount and kill, and at last to
    aborting the FUSE connection |conn| (fuse_connection()) if the daemon is stuck even then."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", path], capture_output=True, timeout=30)
    if proc is not None:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=30)
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            if conn is None:
                raise
            abort_connection(conn)
            proc.wait(timeout=30)


class Mount:
    """Runs `ckptfs -f CHECKPOINT DIR` for the duration of a with-block (|env|: the daemon's
    environment, e.g. with LD_PRELOAD for fault injection; |prefix|: a command that runs it,
    e.g. ["nice", "-n", "5"])."""

    def __init__(self, checkpoint, *args, env=None, prefix=()):
        self.checkpoint = checkpoint
        self.args = list(args)
        self.env = env
        self.prefix = list(prefix)
        self.path = None
        self.proc = None
        self.conn = None
        self.stderr_text = ""

    def __enter__(self):
        require_fuse()
        self.path = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([*self.prefix, BINARY, "-f", *self.args, self.checkpoint, self.path],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_file, env=self.env)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                self.stderr_file.seek(0)
                err = self.stderr_file.read()
                os.rmdir(self.path)
                raise AssertionError(f"ckptfs exited with {self.proc.returncode} before mounting: {err}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError("ckptfs did not mount within 30 s")
            time.sleep(0.02)
        self.conn = fuse_connection(self.path)
        return self

    def __exit__(self, *exc):
        unmount(self.path, self.proc, self.conn)
        self.stderr_file.seek(0)
        self.stderr_text = self.stderr_file.read()
        self.stderr_file.close()
        if not is_mounted(self.path):
            os.rmdir(self.path)
        return False

    def file(self, rel):
        return os.path.join(self.path, rel)

    def stderr_text_now(self):
        """The daemon's stderr so far (the -d log), read through a file description of its own:
        the daemon writes through ours, whose offset it shares, so seeking ours would move
        where the daemon writes."""
        with open(f"/proc/{self.proc.pid}/fd/2") as f:
            return f.read()

    def index(self):
        with open(self.file(".ckptfs/index.json")) as f:
            return json.load(f)

    def stats(self):
        with open(self.file(".ckptfs/stats")) as f:
            return json.load(f)

    def wait_prefaulted(self, timeout=60):
        """Waits until the daemon has backed its cache (a SCHED_IDLE thread does it after
        mounting), so its RSS stops moving on its own; returns the stats then."""
        return wait_prefaulted(self.stats, timeout)


def wait_prefaulted(read_stats, timeout=60):
    """|read_stats|() gives a mount's /.ckptfs/stats; waits until the daemon's prefault has
    finished (daemon_prefaulted_bytes then says how much of the cache it backed: all of it, or
    less on a kernel that cannot), and its listing after mounting too (its thread, child and
    descriptors are gone then), and returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_stats()
        if st["daemon_prefault_finished"] and st.get("prelist_finished", True):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon's cache was not prefaulted within {timeout} s: {st}")
        time.sleep(0.02)


class ReaderProcess:
    """reader_worker.py in a child process: it prints "ready", waits for go() (so a baseline can
    be taken first), then prints one JSON line that result() returns."""

    WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reader_worker.py")

    def __init__(self, *args, stderr=None):
        self.proc = subprocess.Popen(["/usr/bin/python3", self.WORKER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout=600):
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"reader failed with {self.proc.returncode}"
        return json.loads(out.strip().splitlines()[-1])


def resident_pages(path):
    """(pages of |path| in the page cache, pages of |path|), by mincore() on a shared mapping:
    looking touches no page, so for a FUSE file it sends no READ."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if pages == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
            return sum(b & 1 for b in vec.raw), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def reclaim_counters():
    """What the kernel's own reclaim has taken so far (pgsteal_*), and whether a DAMON
    'pageout' scheme is running (these VMs run one on physical memory: it drops page-cache
    pages that were touched at most once in a while, within seconds, and counts in no
    pgsteal). Compare two calls to tell whether anything besides ckptfs may have dropped a
    page of a mounted file between them."""
    steal = 0
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name.startswith("pgsteal_"):
                steal += int(value)
    damon = False
    root = "/sys/kernel/mm/damon/admin/kdamonds"

    def numbered(d):  # the sysfs tree numbers its kdamonds, contexts and schemes
        return [os.path.join(d, n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []

    try:
        for kd in numbered(root):
            with open(os.path.join(kd, "state")) as f:
                if f.read().strip() != "on":
                    continue
            for ctx in numbered(os.path.join(kd, "contexts")):
                for sc in numbered(os.path.join(ctx, "schemes")):
                    with open(os.path.join(sc, "action")) as f:
                        damon |= f.read().strip() == "pageout"
    except OSError:
        damon = True  # unreadable (not root?): assume the worst
    return {"pgsteal": steal, "damon_pageout": damon}


def reclaim_ran_since(before):
    """Whether something besides ckptfs may have dropped page-cache pages since |before|
    (reclaim_counters()): a DAMON pageout scheme is on, or the kernel's reclaim took pages."""
    now = reclaim_counters()
    return now["damon_pageout"] or now["pgsteal"] != before["pgsteal"]


def run_ckptfs(*args, timeout=60):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout)


# ---- torch ground truth -------------------------------------------------------------------

def torch_tensors(obj):
    """Walks what torch.load returned the way ckptfs lays it out: dict keys, list/tuple
    indices, object attributes. Returns {key path tuple: tensor}."""
    import torch

    found = {}
    on_path = set()  # only cycles stop the walk: ckptfs expands shared containers everywhere

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            found[path] = o
            return
        if id(o) in on_path:
            return
        if isinstance(o, dict):
            items = list(o.items())
        elif isinstance(o, (list, tuple)):
            items = list(enumerate(o))
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            items = list(vars(o).items())
        else:
            return
        on_path.add(id(o))
        for k, v in items:
            walk(v, path + (k,))
        on_path.discard(id(o))

    walk(obj, ())
    return found


def torch_bytes(t):
    """The C-contiguous little-endian bytes torch holds for |t|."""
    import torch
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def dtype_name(t):
    return str(t.dtype).replace("torch.", "")
