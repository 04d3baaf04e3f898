// What a mount (or ls/info/convert) serves: one checkpoint file, or several merged into one
// tree: the shards a Hugging Face index names (`*.bin.index.json`, `*.safetensors.index.json`,
// or the directory holding one), or files given together.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "byte_source.h"
#include "catalog.h"
#include "segmented_source.h"

namespace ckptfs {

class CheckpointSet {
 public:
  // Resolves each argument (a checkpoint file, an index JSON, a directory with one index) to
  // its files and loads them. Throws FormatError / IoError with a one-line message that names
  // the file at fault.
  explicit CheckpointSet(const std::vector<std::string>& arguments);
  CheckpointSet(const CheckpointSet&) = delete;
  CheckpointSet& operator=(const CheckpointSet&) = delete;

  TensorCatalog& catalog() { return catalog_; }
  const TensorCatalog& catalog() const { return catalog_; }
  // Where tensor bytes come from: the storages' offsets are offsets in this source.
  const ByteSource& data() const { return *data_; }
  // Every checkpoint file, in load order.
  const std::vector<std::string>& files() const { return names_; }
  // For messages and the mount's fsname: the one argument, or "N files".
  const std::string& name() const { return name_; }
  static std::string describe(const std::vector<std::string>& arguments);
  // The checkpoint files' sizes, summed (as opened: the sources keep them).
  std::uint64_t file_bytes() const;
  // Drops what loading the metadata left in the page cache of every file.
  void drop_cache() const;

 private:
  std::vector<std::unique_ptr<LocalFileSource>> files_;
  std::vector<std::unique_ptr<ByteSource>> inflated_;  // per file, when it has deflated records
  std::unique_ptr<SegmentedSource> combined_;          // only for several files
  const ByteSource* data_ = nullptr;
  TensorCatalog catalog_;
  std::vector<std::string> names_;
  std::string name_;
};

}  // namespace ckptfs
