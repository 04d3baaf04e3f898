#include "fuse_server.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "json_text.h"

namespace ckptfs {
namespace {

// The checkpoint is immutable for the life of the mount: let the kernel cache names and
// attributes for as long as it likes.
constexpr double kForever = 365.0 * 24 * 3600;
constexpr std::uint64_t kMaxLoggedErrors = 50;

MountState& state_of(fuse_req_t req) {
  return *static_cast<MountState*>(fuse_req_userdata(req));
}

// Inode numbers are catalog node indices plus one (FUSE_ROOT_ID is 1 = the root node 0).
bool node_of(const MountState& s, fuse_ino_t ino, NodeIndex& out) {
  if (ino < 1 || ino > s.catalog.node_count()) return false;
  out = static_cast<NodeIndex>(ino - 1);
  return true;
}

void log_error(MountState& s, const std::string& what) {
  ++s.read_errors;
  if (s.logged_errors.fetch_add(1) < kMaxLoggedErrors)
    std::fprintf(stderr, "ckptfs: %s\n", what.c_str());
}

// The stats file's mtime is the time of each getattr, never the same twice: with
// FUSE_AUTO_INVAL_DATA the kernel drops its cached page when the mtime moves, so a read()
// (which asks for attributes first: their timeout is 0) renders the numbers anew.
std::timespec next_stats_mtime(const MountState& s) {
  std::timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  const std::int64_t wanted = now.tv_sec * 1'000'000'000LL + now.tv_nsec;
  std::int64_t prev = s.stats_mtime_ns.load();
  std::int64_t next = 0;
  do {
    next = std::max(wanted, prev + 1);
  } while (!s.stats_mtime_ns.compare_exchange_weak(prev, next));
  return {.tv_sec = next / 1'000'000'000LL, .tv_nsec = next % 1'000'000'000LL};
}

double attr_timeout_of(const Node& n) {
  return n.kind == NodeKind::StatsFile ? 0.0 : kForever;
}

struct stat make_stat(const MountState& s, NodeIndex i) {
  struct stat st {};
  const Node n = s.catalog.node(i);
  st.st_ino = i + 1;
  st.st_uid = s.uid;
  st.st_gid = s.gid;
  st.st_atim = st.st_mtim = st.st_ctim = s.mtime;
  st.st_blksize = 4096;
  switch (n.kind) {
    case NodeKind::Directory:
      st.st_mode = S_IFDIR | 0555;
      st.st_nlink = 2;
      break;
    case NodeKind::TensorData: {
      const TensorInfo& t = s.catalog.tensors()[n.tensor()];
      st.st_mode = S_IFREG | 0444;
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(t.nbytes());
      st.st_blocks = static_cast<blkcnt_t>((t.nbytes() + 511) / 512);  // du counts tensor bytes
      break;
    }
    case NodeKind::NpyView: {
      // The same bytes as the raw file behind a small header: no blocks, so du counts the
      // tensor once.
      const TensorInfo& t = s.catalog.tensors()[n.tensor()];
      st.st_mode = S_IFREG | 0444;
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(TensorCatalog::npy_header(t).size() + t.nbytes());
      break;
    }
    case NodeKind::StatsFile:
      st.st_mode = S_IFREG | 0444;
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(render_stats(s).size());  // the same on every render
      st.st_mtim = next_stats_mtime(s);
      break;
    case NodeKind::SafetensorsFile:
      // Like the .npy views, no blocks: du counts the tensors once, in their own files.
      st.st_mode = S_IFREG | 0444;
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(s.safetensors().size());
      break;
    default:  // generated JSON: du counts (almost) nothing for it
      st.st_mode = S_IFREG | 0444;
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(s.catalog.generated_size(i));
      break;
  }
  return st;
}

// Files smaller than this are not preloaded at their LOOKUP: the kernel reads them whole in the
// one READ that follows the LOOKUP at once, which a preload would have to overtake to save
// anything (storing a 4 KiB file right after its LOOKUP's reply won the race for 97 % of files
// and still cost more than the READ it saved: design.md). Ahead of a listing reader, where the
// store has a whole file's time, any size is (preload_ahead).
constexpr std::uint64_t kPreloadMinBytes = std::uint64_t{256} << 10;

// Preloads start only once the kernel's share has filled (the ledger keeps it within 1/16 below
// the share from then on), when each page stored takes the place of one invalidated. Before
// that, every store fills fresh memory, slow to touch on these VMs, from the one notifier
// thread, where READ replies fill it from many: a first pass over 2 GiB with a 2 GiB share took
// 3.6-4.8 s with preloads from the start and 3.4-4.2 s without (medians of 6 runs of 4-8 rounds).
bool kernel_share_filled(const MountState& s) {
  return s.ledger.served_bytes() >= s.ledger.budget() - s.ledger.budget() / 8;
}

// A LOOKUP of a tensor file is, most of the time, a reader about to open it; and on a fresh
// mount the kernel cannot read ahead across files, so each file's first page fault waits for a
// READ round trip, and the faults after it for the kernel's readahead. Storing the file's first
// bytes in the page cache from the notifier's thread, while the reader is still opening and
// mapping it, turns those waits into page-cache hits (streaming 512 files of 4 MiB cold under
// --limit-mb 512, 6 alternating rounds: 2.55 s -> 2.20 s, the purge loop 1.96 s; the bench's
// target 1 runs the loop both ways). A LOOKUP without a read costs a background read of at
// most preload_bytes; what is stored counts against the budget like any reply. |size| is the
// file's, as the LOOKUP's reply gave it.
void maybe_preload(MountState& s, fuse_ino_t ino, const Node& n, std::uint64_t size) {
  if (s.notifier == nullptr || s.preload_bytes == 0) return;
  if (n.kind != NodeKind::TensorData && n.kind != NodeKind::NpyView) return;
  if (!s.catalog.tensors()[n.tensor()].error().empty()) return;
  if (size < kPreloadMinBytes) return;
  if (!kernel_share_filled(s)) return;
  s.notifier->preload(ino, std::min(size, s.preload_bytes));
}

// A reader that listed the directory first (os.listdir, glob, ls, cp -r) opens every file with
// no LOOKUP, so nothing preloads its files: its cold stream ran 7-12 % slower than one that
// only opened them (1.70-1.76 s against 1.57-1.59 s, 512 x 4 MiB, --limit-mb 512). What it does
// send is the READ at the start of each file it reaches cold; that READ preloads the next
// files of the same kind in the catalog's order (the pickle's for torch files, the header's
// for safetensors), as long as the kernel holds them (KnownInodes: the listing handed them
// out; a reader that did not list gets nothing stored ahead). The files stored whole are then
// read with no request at all, so the next READ, and the next preloads, come at the first
// file past them: at least kMinAheadFiles, and more while they add up to less than one
// LOOKUP preload (preload_bytes: 8 MiB at most), up to KernelNotifier::kMaxAheadFiles. For a
// small file the READ it saves is most of its cost: listing, then reading every file with
// read() into one buffer, 32,768 files of 16 KiB took 2.05 -> 1.37 s and 8,192 of 64 KiB
// 0.81 -> 0.71 s against two files ahead (medians of 4 alternating rounds, --limit-mb 128).
// With two ahead of 4 MiB files, the memmap loop's medians went 1.69 -> 1.63 s and
// 1.77 -> 1.62 s (6 and 8 rounds); four ahead stored more and ran no faster.
constexpr std::uint32_t kMinAheadFiles = 2;

// Called after the READ's reply: it never fails the request, which has been answered.
void preload_ahead(MountState& s, NodeIndex reading, const Node& n) noexcept {
  if (s.notifier == nullptr || s.preload_bytes == 0) return;
  const auto& tensors = s.catalog.tensors();
  // The cheap test first: this runs on every READ at offset 0, which for small files is every
  // READ, and most readers hold no file past the one they opened.
  const auto next_node = [&](std::uint64_t t) {
    const auto ti = static_cast<std::uint32_t>(t);
    return n.kind == NodeKind::NpyView ? s.catalog.npy_node(ti) : tensors[ti].data_node;
  };
  const std::uint64_t first = std::uint64_t{n.tensor()} + 1;
  if (first >= tensors.size()) return;
  if (const NodeIndex f = next_node(first); f == kNoNode || !s.known.contains(f + 1u)) return;
  if (!kernel_share_filled(s)) return;
  try {
    std::array<KernelNotifier::AheadFile, KernelNotifier::kMaxAheadFiles> files{};
    std::size_t count = 0;
    std::uint64_t bytes = 0;
    // Files that cannot be stored (no view, a broken tensor) are passed over, a bounded
    // number of them: this runs on a request thread.
    const std::uint64_t last = std::min<std::uint64_t>(tensors.size(), first + 2 * files.size());
    for (std::uint64_t t = first;
         t < last && count < files.size() && (count < kMinAheadFiles || bytes < s.preload_bytes);
         ++t) {
      const NodeIndex next = next_node(t);
      if (next == kNoNode) continue;
      if (!s.known.contains(next + 1u)) break;  // the end of what the reader listed
      if (!tensors[t].error().empty()) continue;
      const auto size = static_cast<std::uint64_t>(make_stat(s, next).st_size);
      if (size == 0) continue;
      files[count++] = {next + 1u, std::min(size, s.preload_bytes)};
      bytes += size;
    }
    s.notifier->preload_ahead(reading + 1u, std::span(files.data(), count));
  } catch (const std::exception&) {
    // Nothing preloaded: that file's own READs will meet the same problem and report it.
  }
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  MountState& s = state_of(req);
  NodeIndex dir;
  if (!node_of(s, parent, dir) || s.catalog.node(dir).kind != NodeKind::Directory) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  fuse_entry_param e{};
  e.attr_timeout = kForever;
  e.entry_timeout = kForever;
  NodeIndex child = s.catalog.lookup(dir, name);
  if (child == kNoNode) {
    e.ino = 0;  // a negative entry the kernel may cache: the tree never changes
    fuse_reply_entry(req, &e);
    return;
  }
  try {
    e.ino = child + 1;
    e.attr = make_stat(s, child);
    e.attr_timeout = attr_timeout_of(s.catalog.node(child));
    s.known.add(e.ino);
    // After the reply: the kernel refuses stores for an inode it does not know yet.
    if (fuse_reply_entry(req, &e) == 0)
      maybe_preload(s, e.ino, s.catalog.node(child), static_cast<std::uint64_t>(e.attr.st_size));
  } catch (const std::exception& ex) {
    log_error(s, fmt::format("lookup of '{}': {}", name, ex.what()));
    fuse_reply_err(req, EIO);
  }
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  MountState& s = state_of(req);
  NodeIndex i;
  if (!node_of(s, ino, i)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  try {
    struct stat st = make_stat(s, i);
    fuse_reply_attr(req, &st, attr_timeout_of(s.catalog.node(i)));
  } catch (const std::exception& ex) {
    log_error(s, fmt::format("getattr: {}", ex.what()));
    fuse_reply_err(req, EIO);
  }
}

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  MountState& s = state_of(req);
  NodeIndex i;
  if (!node_of(s, ino, i)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (s.catalog.node(i).kind != NodeKind::Directory) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  fi->keep_cache = 1;
  fi->cache_readdir = 1;
  fuse_reply_open(req, fi);
}

void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  MountState& s = state_of(req);
  NodeIndex dir;
  if (!node_of(s, ino, dir) || s.catalog.node(dir).kind != NodeKind::Directory) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  const Node d = s.catalog.node(dir);
  // Offsets: 0 = ".", 1 = "..", 2 + slot = the directory's entry(slot); empty slots are skipped.
  std::vector<char> buf(size);
  std::size_t used = 0;
  std::string name;
  const auto total = static_cast<off_t>(s.catalog.entry_slots(dir) + 2);
  for (off_t pos = off; pos < total; ++pos) {
    NodeIndex target = pos == 0   ? dir
                       : pos == 1 ? (d.parent == kNoNode ? dir : d.parent)
                                  : s.catalog.entry(dir, static_cast<std::size_t>(pos - 2));
    if (target == kNoNode) continue;
    if (pos < 2) {
      name = pos == 0 ? "." : "..";
    } else {
      const Node n = s.catalog.node(target);
      name.assign(n.stem());
      name += suffix_text(n.suffix);
    }
    struct stat st = make_stat(s, target);
    std::size_t need;
    if (plus) {
      fuse_entry_param e{};
      e.attr = st;
      e.attr_timeout = attr_timeout_of(s.catalog.node(target));
      e.entry_timeout = kForever;
      // "." and ".." must not take a lookup reference.
      e.ino = pos < 2 ? 0 : target + 1;
      if (pos < 2) e.attr.st_ino = target + 1;
      need = fuse_add_direntry_plus(req, buf.data() + used, size - used, name.c_str(), &e, pos + 1);
    } else {
      need = fuse_add_direntry(req, buf.data() + used, size - used, name.c_str(), &st, pos + 1);
    }
    if (need > size - used) break;
    if (plus && pos >= 2) s.known.add(target + 1u);
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  do_readdir(req, ino, size, off, false);
}

void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  do_readdir(req, ino, size, off, true);
}

// The kernel drops an inode whole: whatever |nlookup| says, it no longer holds |ino|.
void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t /*nlookup*/) {
  state_of(req).known.forget(ino);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  MountState& s = state_of(req);
  for (const fuse_forget_data& f : std::span(forgets, count)) s.known.forget(f.ino);
  fuse_reply_none(req);
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  MountState& s = state_of(req);
  if (s.skip_opens) {
    // Only the opens sent before the kernel reads this first ENOSYS get here: it then opens
    // every file itself (keep_cache, fh 0) and sends neither OPEN nor RELEASE for the rest of
    // the mount (op_init says why). The mount is read-only, so no write open is let through.
    fuse_reply_err(req, ENOSYS);
    return;
  }
  NodeIndex i;
  if (!node_of(s, ino, i)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  const Node n = s.catalog.node(i);
  if (n.kind == NodeKind::Directory) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  if ((fi->flags & O_ACCMODE) != O_RDONLY) {
    fuse_reply_err(req, EROFS);
    return;
  }
  // A tensor that cannot be served fails loudly at open: never an empty or partial file.
  if ((n.kind == NodeKind::TensorData || n.kind == NodeKind::NpyView) &&
      !s.catalog.tensors()[n.tensor()].error().empty()) {
    log_error(s, fmt::format("open of '{}': {}", s.catalog.relative_path(i),
                             s.catalog.tensors()[n.tensor()].error()));
    fuse_reply_err(req, EIO);
    return;
  }
  if (n.kind == NodeKind::StatsFile) {
    fi->direct_io = 1;  // fresh numbers on every read, never cached
  } else {
    // Without keep_cache every open() would drop every reader's cached pages of this file.
    fi->keep_cache = 1;
  }
  fi->noflush = 1;
  fuse_reply_open(req, fi);
}

// Every byte a reply hands the kernel may stay in its page cache: account it against the
// budget after the reply (the kernel has copied the data into its pages by then, so an
// invalidation racing with this cannot leave an unaccounted page behind).
void account_reply(MountState& s, fuse_ino_t ino, std::uint64_t offset, std::size_t length) {
  if (s.ledger.record(ino, offset, length) && s.notifier != nullptr) s.notifier->wake();
}

void reply_slice(MountState& s, fuse_req_t req, fuse_ino_t ino, std::string_view content,
                 size_t size, off_t off, bool cached = true) {
  auto start = static_cast<std::size_t>(off);
  if (start >= content.size()) {
    fuse_reply_buf(req, nullptr, 0);
    return;
  }
  std::size_t len = std::min(size, content.size() - start);
  if (fuse_reply_buf(req, content.data() + start, len) == 0 && cached)
    account_reply(s, ino, start, len);
}

// A reply from the cache's blocks is at most this many pieces (a strided view's short runs
// take the copy instead: the kernel's per-piece cost would outweigh ours).
constexpr std::size_t kMaxReplyPieces = 64;

// One reply buffer per worker thread, reused: no allocation or first touch per read.
std::span<std::byte> reply_buffer(std::size_t len) {
  thread_local std::vector<std::byte> buffer;
  if (buffer.size() < len) buffer.resize(len);
  return std::span(buffer.data(), len);
}

// Copies the tensor file's bytes at |start| into |out|, which must end within the file: |header|
// (empty for the raw file, the NPY header for X.npy) followed by the tensor's bytes.
void copy_tensor_file(MountState& s, const TensorInfo& t, std::string_view header,
                      std::uint64_t start, std::span<std::byte> out) {
  const std::size_t in_header =
      start < header.size()
          ? std::min<std::size_t>(out.size(), header.size() - static_cast<std::size_t>(start))
          : 0;
  if (in_header > 0) std::memcpy(out.data(), header.data() + start, in_header);
  s.reader.read(t, start + in_header - header.size(), out.subspan(in_header));
}

// A tensor file: |header| (empty for the raw file, the NPY header for X.npy) followed by the
// tensor's bytes. Full length except at end of file: a short read would look like EOF.
void reply_tensor(MountState& s, fuse_req_t req, fuse_ino_t ino, const TensorInfo& t,
                  std::string_view header, size_t size, off_t off) {
  if (!t.error().empty()) {
    log_error(s, fmt::format("read of '{}': {}", s.catalog.path_of(t), t.error()));
    fuse_reply_err(req, EIO);
    return;
  }
  const std::uint64_t total = header.size() + t.nbytes();
  auto start = static_cast<std::uint64_t>(off);
  if (start >= total) {
    fuse_reply_buf(req, nullptr, 0);
    return;
  }
  std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(size, total - start));
  const std::size_t in_header =
      start < header.size()
          ? std::min<std::size_t>(len, header.size() - static_cast<std::size_t>(start))
          : 0;
  // Straight from the cache's blocks when they are loaded: the kernel copies them into its
  // pages, and our copy into a reply buffer is saved (a quarter of the daemon's CPU when
  // streaming 2 GiB, measured). The pins hold the blocks until the reply is written.
  thread_local std::vector<BlockCache::Pin> pins;
  thread_local std::vector<std::span<const std::byte>> pieces;
  thread_local std::vector<iovec> iov;
  pins.clear();
  pieces.clear();
  struct Unpin {  // on every way out, exceptions included: a pin kept would block eviction
    std::vector<BlockCache::Pin>& held;
    ~Unpin() { held.clear(); }
  } unpin{pins};
  if (in_header > 0) pieces.push_back(std::as_bytes(std::span(header.substr(start, in_header))));
  if (in_header == len || s.reader.pin_pieces(t, start + in_header - header.size(), len - in_header,
                                              pins, pieces, kMaxReplyPieces)) {
    iov.clear();
    for (std::span<const std::byte> p : pieces)
      iov.push_back({const_cast<std::byte*>(p.data()), p.size()});
    if (fuse_reply_iov(req, iov.data(), static_cast<int>(iov.size())) == 0)
      account_reply(s, ino, start, len);
    return;
  }
  std::span<std::byte> buffer = reply_buffer(len);
  copy_tensor_file(s, t, header, start, buffer);
  if (fuse_reply_buf(req, reinterpret_cast<const char*>(buffer.data()), len) == 0)
    account_reply(s, ino, start, len);
}

void reply_safetensors(MountState& s, fuse_req_t req, fuse_ino_t ino, size_t size, off_t off) {
  const SafetensorsView& view = s.safetensors();
  auto start = static_cast<std::uint64_t>(off);
  if (start >= view.size()) {
    fuse_reply_buf(req, nullptr, 0);
    return;
  }
  auto len = static_cast<std::size_t>(std::min<std::uint64_t>(size, view.size() - start));
  std::span<std::byte> buffer = reply_buffer(len);
  view.read(start, buffer, s.reader);
  if (fuse_reply_buf(req, reinterpret_cast<const char*>(buffer.data()), len) == 0)
    account_reply(s, ino, start, len);
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  MountState& s = state_of(req);
  NodeIndex i;
  if (!node_of(s, ino, i) || off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  const Node n = s.catalog.node(i);
  try {
    switch (n.kind) {
      case NodeKind::TensorData:
        reply_tensor(s, req, ino, s.catalog.tensors()[n.tensor()], "", size, off);
        if (off == 0) preload_ahead(s, i, n);
        return;
      case NodeKind::NpyView: {
        const TensorInfo& t = s.catalog.tensors()[n.tensor()];
        reply_tensor(s, req, ino, t, TensorCatalog::npy_header(t), size, off);
        if (off == 0) preload_ahead(s, i, n);
        return;
      }
      case NodeKind::TensorSidecar:
        reply_slice(s, req, ino, s.catalog.sidecar_json(s.catalog.tensors()[n.tensor()]), size,
                    off);
        return;
      case NodeKind::JsonValue:
        reply_slice(s, req, ino, s.catalog.text(i), size, off);
        return;
      case NodeKind::IndexFile:
        reply_slice(s, req, ino, s.catalog.index_json(), size, off);
        return;
      case NodeKind::StatsFile:
        // Page-cached when opens are skipped (op_init), else direct_io.
        reply_slice(s, req, ino, render_stats(s), size, off, /*cached=*/s.skip_opens);
        return;
      case NodeKind::SafetensorsFile:
        reply_safetensors(s, req, ino, size, off);
        return;
      case NodeKind::Directory:
        fuse_reply_err(req, EISDIR);
        return;
    }
  } catch (const IoError& ex) {
    log_error(s, fmt::format("read of '{}': {}", s.catalog.relative_path(i), ex.what()));
    fuse_reply_err(req, EIO);
  } catch (const std::bad_alloc&) {
    fuse_reply_err(req, ENOMEM);
  } catch (const std::exception& ex) {
    log_error(s, fmt::format("read of '{}': {}", s.catalog.relative_path(i), ex.what()));
    fuse_reply_err(req, EIO);
  }
}

// Extended attributes of tensor files (raw and .npy): what `getfattr -d` shows.
std::vector<std::pair<std::string, std::string>> tensor_xattrs(const TensorCatalog& c,
                                                               const TensorInfo& t) {
  std::string shape;
  append_json_int_array(shape, t.shape());
  std::string key;
  append_json_key(key, t.key());
  std::vector<std::pair<std::string, std::string>> out = {
      {"user.ckptfs.dtype", std::string(t.dtype().name)},
      {"user.ckptfs.numpy_dtype", std::string(t.dtype().numpy_dtype)},
      {"user.ckptfs.shape", shape},
      {"user.ckptfs.nbytes", fmt::format("{}", t.nbytes())},
      {"user.ckptfs.key", key},
  };
  if (t.storage != kNoStorage) {
    out.emplace_back("user.ckptfs.storage", c.storages()[t.storage].key());
    out.emplace_back("user.ckptfs.record", c.storages()[t.storage].record());
  }
  if (!t.error().empty()) out.emplace_back("user.ckptfs.error", t.error());
  return out;
}

const TensorInfo* tensor_of(const MountState& s, fuse_ino_t ino) {
  NodeIndex i;
  if (!node_of(s, ino, i)) return nullptr;
  const Node n = s.catalog.node(i);
  if (n.kind != NodeKind::TensorData && n.kind != NodeKind::NpyView &&
      n.kind != NodeKind::TensorSidecar)
    return nullptr;
  return &s.catalog.tensors()[n.tensor()];
}

// The xattr protocol: size 0 asks for the length; a too-small buffer is ERANGE.
void reply_xattr_value(fuse_req_t req, const std::string& value, size_t size) {
  if (size == 0) {
    fuse_reply_xattr(req, value.size());
  } else if (size < value.size()) {
    fuse_reply_err(req, ERANGE);
  } else {
    fuse_reply_buf(req, value.data(), value.size());
  }
}

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  MountState& s = state_of(req);
  if (!s.xattrs) {
    fuse_reply_err(req, ENOSYS);
    return;
  }
  // ls -l asks every file for its security label and POSIX ACL. "Not supported" is the true
  // answer (ckptfs has neither) and, unlike "no such attribute", ls remembers it for the whole
  // mount: two round trips per file become two per listing. user.* is supported.
  const std::string_view requested(name);
  if (!requested.starts_with("user.")) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  if (!requested.starts_with("user.ckptfs.")) {
    fuse_reply_err(req, ENODATA);
    return;
  }
  if (const TensorInfo* t = tensor_of(s, ino)) {
    for (const auto& [k, v] : tensor_xattrs(s.catalog, *t)) {
      if (k == name) {
        reply_xattr_value(req, v, size);
        return;
      }
    }
  }
  fuse_reply_err(req, ENODATA);
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  MountState& s = state_of(req);
  if (!s.xattrs) {
    fuse_reply_err(req, ENOSYS);
    return;
  }
  std::string names;
  if (const TensorInfo* t = tensor_of(s, ino)) {
    for (const auto& kv : tensor_xattrs(s.catalog, *t)) {
      names += kv.first;
      names.push_back('\0');
    }
  }
  reply_xattr_value(req, names, size);
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  MountState& s = state_of(req);
  struct statvfs sv {};
  std::uint64_t bytes = 0;
  for (const auto& t : s.catalog.tensors()) bytes += t.nbytes();
  sv.f_bsize = 4096;
  sv.f_frsize = 4096;
  sv.f_blocks = (bytes + 4095) / 4096;
  sv.f_files = s.catalog.node_count();
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

void op_init(void* userdata, fuse_conn_info* conn) {
  // Readahead READs are background requests, 12 at a time by default: several readers
  // streaming at once (or one reader far ahead) would queue behind that.
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  // Every listing carries its entries' attributes (READDIRPLUS), not just its first batch
  // (READDIRPLUS_AUTO): ls -l, find -size or os.scandir + stat then need no LOOKUP per file.
  conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
  // Of the requests of an open/read/close, OPEN and RELEASE carry nothing here unless a tensor
  // must fail at open: every file is read-only (the mount is ro) and kept in the page cache.
  // Answering the first OPEN with ENOSYS makes the kernel skip them for good (NO_OPEN_SUPPORT):
  // a round trip less per file read, none at all when its pages are cached. What OPEN also
  // did, direct_io for the stats file, becomes AUTO_INVAL_DATA with a moving mtime.
  auto& s = *static_cast<MountState*>(userdata);
  if (!s.opens_needed && (conn->capable & FUSE_CAP_NO_OPEN_SUPPORT) != 0 &&
      (conn->capable & FUSE_CAP_AUTO_INVAL_DATA) != 0) {
    conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
    s.skip_opens = true;
  }
  s.initialized = true;
}

fuse_lowlevel_ops make_ops() {
  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.lookup = op_lookup;
  ops.forget = op_forget;
  ops.forget_multi = op_forget_multi;
  ops.getattr = op_getattr;
  ops.opendir = op_opendir;
  ops.readdir = op_readdir;
  ops.readdirplus = op_readdirplus;
  ops.open = op_open;
  ops.read = op_read;
  ops.statfs = op_statfs;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  return ops;
}

}  // namespace

const fuse_lowlevel_ops& fuse_operations() {
  static const fuse_lowlevel_ops ops = make_ops();
  return ops;
}

std::size_t read_for_preload(MountState& s, std::uint64_t ino, std::uint64_t offset,
                             std::span<std::byte> out) {
  NodeIndex i;
  if (!node_of(s, ino, i)) return 0;
  const Node n = s.catalog.node(i);
  if (n.kind != NodeKind::TensorData && n.kind != NodeKind::NpyView) return 0;
  const TensorInfo& t = s.catalog.tensors()[n.tensor()];
  if (!t.error().empty()) return 0;
  const std::string header = n.kind == NodeKind::NpyView ? TensorCatalog::npy_header(t) : "";
  const std::uint64_t size = header.size() + t.nbytes();
  if (offset >= size) return 0;
  const auto len = static_cast<std::size_t>(std::min<std::uint64_t>(out.size(), size - offset));
  copy_tensor_file(s, t, header, offset, out.first(len));
  return len;
}

std::string render_stats(const MountState& state) {
  BlockCache::Stats c = state.cache.stats();
  const std::uint64_t kernel = state.ledger.served_bytes();
  const KernelNotifier* n = state.notifier;
  const std::uint64_t invalidations = n != nullptr ? n->invalidations() : 0;
  const std::uint64_t invalidated = n != nullptr ? n->invalidated_bytes() : 0;
  // Each value is right-aligned in a field as wide as the largest 64-bit number, so the text
  // is the same length on every render: the size a getattr reported must hold what a later
  // read renders when the kernel caches the file (op_init).
  const auto number = [](std::uint64_t v) { return fmt::format("{:>20}", v); };
  const auto text = [](std::string_view v) {
    return fmt::format("{:>20}", fmt::format("\"{}\"", v));
  };
  const std::pair<std::string_view, std::string> fields[] = {
      {"limit_bytes", number(state.limit_bytes)},
      {"daemon_budget_bytes", number(c.limit_bytes)},
      {"kernel_budget_bytes", number(state.ledger.budget())},
      {"daemon_resident_bytes", number(c.resident_bytes)},
      {"daemon_prefaulted_bytes", number(c.prefaulted_bytes)},
      {"daemon_prefault_finished", fmt::format("{:>20}", c.prefault_finished)},
      {"kernel_served_bytes", number(kernel)},
      {"total_bytes", number(c.resident_bytes + kernel)},
      {"block_size", number(c.block_size)},
      {"blocks", number(c.blocks)},
      {"lookups", number(c.hits + c.misses)},
      {"hits", number(c.hits)},
      {"misses", number(c.misses)},
      {"evictions", number(c.evictions)},
      {"invalidations", number(invalidations)},
      {"invalidated_bytes", number(invalidated)},
      {"preloaded_files", number(n != nullptr ? n->preloaded_files() : 0)},
      {"preloaded_bytes", number(n != nullptr ? n->preloaded_bytes() : 0)},
      {"preload_retries", number(n != nullptr ? n->store_retries() : 0)},
      {"preloaded_ahead_files", number(n != nullptr ? n->preloaded_ahead() : 0)},
      {"preloads_refused", number(n != nullptr ? n->preloads_refused() : 0)},
      {"prelisted_entries", number(state.lister != nullptr ? state.lister->listed() : 0)},
      {"prelist_finished",
       fmt::format("{:>20}", state.lister == nullptr || state.lister->finished())},
      {"bytes_read_from_checkpoint", number(c.bytes_read)},
      {"checkpoint_cache_mode", text(state.source.cache_mode())},
      {"prefetched", number(c.prefetched)},
      {"prefetch_hits", number(c.prefetch_hits)},
      {"prefetch_wasted", number(c.prefetch_wasted)},
      {"checkpoint_read_errors", number(c.read_errors)},
      {"checkpoint_changed", fmt::format("{:>20}", state.source.changed())},
      {"read_errors", number(state.read_errors.load())},
      {"request_thread_slice_ns", number(state.request_slice_ns)},
      {"tensors", number(state.catalog.tensors().size())},
      {"storages", number(state.catalog.storages().size())},
      {"catalog_bytes", number(state.catalog.metadata_bytes())},
  };
  std::string out = "{\n";
  for (const auto& [key, value] : fields) {
    const bool last = &key == &std::end(fields)[-1].first;
    out += fmt::format("  {:<29} {}{}\n", fmt::format("\"{}\":", key), value, last ? "" : ",");
  }
  out += "}\n";
  return out;
}

}  // namespace ckptfs
