// SafetensorsView: a valid safetensors serialization of the tensors of a catalog, described
// but never materialised. The header is built once; the data section is the tensors' own
// images (TensorReader), laid out back to back. It backs /.ckptfs/model.safetensors and
// `ckptfs convert`, so a conversion streams through the block cache like any other reader.
//
// Layout: the format requires the data ranges to cover the data section with no holes, so
// alignment comes from the order. The header is padded with spaces so the data starts at a
// multiple of 8; tensors whose size is a multiple of 8 come first (each 8-byte aligned), then
// the others by element size, largest first (each aligned to its own element size, as the
// reference writer does); checkpoint order otherwise.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "catalog.h"
#include "tensor_reader.h"

namespace ckptfs {

class SafetensorsView {
 public:
  // Every tensor listed in |catalog| (its mount root), keyed by its dotted key path relative to
  // that root ("state_dict.layer.0.weight"; a flat state_dict keeps its keys). |source| names
  // the checkpoint in the header's __metadata__.
  SafetensorsView(const TensorCatalog& catalog, const std::string& source);

  std::uint64_t size() const { return size_; }
  std::size_t tensor_count() const { return entries_.size(); }
  // "key: why" for every tensor left out (no raw form, no safetensors dtype, a clash).
  const std::vector<std::string>& skipped() const { return skipped_; }
  std::uint64_t header_size() const { return prefix_.size(); }

  // Fills |dst| with the file's bytes at |offset|; the range must lie within size().
  void read(std::uint64_t offset, std::span<std::byte> dst, const TensorReader& reader) const;

 private:
  struct Entry {
    std::uint32_t tensor;
    std::uint64_t begin;  // file offset of the tensor's first byte
    std::uint64_t end;
  };
  const TensorCatalog& catalog_;
  std::string prefix_;  // the 8-byte header length, then the padded JSON header
  std::vector<Entry> entries_;
  std::vector<std::string> skipped_;
  std::uint64_t size_ = 0;
};

}  // namespace ckptfs
