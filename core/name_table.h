// NameTable: the names claimed in one directory while it is built, each with a few flag bits.
//
// A directory of 262,144 tensors claims a name per tensor and asks about two more (its .json
// and .npy); with std::unordered_set each question chased a bucket, a heap node and the name.
// Here a question is one probe of a flat array (open addressing, linear probing) that holds
// each name's hash next to its view, so most answers never touch the name's bytes.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <utility>
#include <vector>

namespace ckptfs {

class NameTable {
 public:
  // Room for |expected| names without growing (it still grows if more come).
  explicit NameTable(std::size_t expected) { rehash(std::bit_ceil(expected * 2 + 8)); }

  // The flags of |name|, or nullptr if it was never added. Valid until the next add().
  std::uint8_t* find(std::string_view name) {
    Slot& s = probe(name, hash_of(name));
    return s.used ? &s.flags : nullptr;
  }
  // Adds |name| (a view that must outlive the table) with no flags if it is new; returns its
  // flags either way.
  std::uint8_t& add(std::string_view name) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    const std::uint64_t h = hash_of(name);
    Slot& s = probe(name, h);
    if (!s.used) {
      s = Slot{h, name, 0, true};
      ++count_;
    }
    return s.flags;
  }

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::string_view name;
    std::uint8_t flags = 0;
    bool used = false;
  };

  static std::uint64_t hash_of(std::string_view name) {
    return std::hash<std::string_view>{}(name);
  }

  // The slot holding |name|, or the free slot where it would go.
  Slot& probe(std::string_view name, std::uint64_t h) {
    const std::size_t mask = slots_.size() - 1;
    for (std::size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (!s.used || (s.hash == h && s.name == name)) return s;
    }
  }

  void rehash(std::size_t size) {
    std::vector<Slot> old = std::exchange(slots_, std::vector<Slot>(size));
    for (const Slot& s : old) {
      if (s.used) probe(s.name, s.hash) = s;
    }
  }

  std::vector<Slot> slots_;
  std::size_t count_ = 0;
};

}  // namespace ckptfs
