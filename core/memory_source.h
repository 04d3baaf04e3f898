// A ByteSource over bytes held in memory: fuzzing and tests open checkpoints without a file.
#pragma once

#include <fmt/format.h>

#include <cstring>
#include <span>
#include <vector>

#include "byte_source.h"
#include "errors.h"

namespace ckptfs {

class MemorySource final : public ByteSource {
 public:
  explicit MemorySource(std::vector<std::byte> bytes) : bytes_(std::move(bytes)) {}
  MemorySource(const std::uint8_t* data, std::size_t size)
      : bytes_(reinterpret_cast<const std::byte*>(data),
               reinterpret_cast<const std::byte*>(data) + size) {}

  std::uint64_t size() const override { return bytes_.size(); }
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const override {
    if (offset > bytes_.size() || dst.size() > bytes_.size() - offset) {
      throw IoError(fmt::format("read of {} bytes at offset {} runs past the end ({} bytes)",
                                dst.size(), offset, bytes_.size()),
                    EIO);
    }
    if (!dst.empty()) std::memcpy(dst.data(), bytes_.data() + offset, dst.size());
  }
  std::timespec mtime() const override { return {}; }
  std::string describe() const override { return "memory"; }

 private:
  std::vector<std::byte> bytes_;
};

}  // namespace ckptfs
