#include "byte_source.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "errors.h"

namespace ckptfs {

LocalFileSource::LocalFileSource(const std::string& path) : path_(path) {
  fd_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd_) {
    int err = errno;
    throw IoError(fmt::format("cannot open '{}': {}", path, std::strerror(err)), err);
  }
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) {
    int err = errno;
    throw IoError(fmt::format("cannot stat '{}': {}", path, std::strerror(err)), err);
  }
  if (!S_ISREG(st.st_mode)) {
    throw IoError(fmt::format("'{}' is not a regular file", path), EINVAL);
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
  mtime_ = st.st_mtim;
}

void LocalFileSource::read_at(std::uint64_t offset, std::span<std::byte> dst) const {
  if (offset > size_ || dst.size() > size_ - offset) {
    throw IoError(fmt::format("read of {} bytes at offset {} runs past the end of '{}' ({} bytes)",
                              dst.size(), offset, path_, size_),
                  EIO);
  }
  std::size_t done = 0;
  while (done < dst.size()) {
    ssize_t n = ::pread(fd_.get(), dst.data() + done, dst.size() - done,
                        static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      int err = errno;
      throw IoError(fmt::format("read error in '{}' at offset {}: {}", path_, offset + done,
                                std::strerror(err)),
                    err);
    }
    if (n == 0) {
      // The file shrank under us: never hand out a short buffer.
      throw IoError(fmt::format("'{}' ended at offset {} (truncated while mounted?)", path_,
                                offset + done),
                    EIO);
    }
    done += static_cast<std::size_t>(n);
  }
}

}  // namespace ckptfs
