// NameMap: a map from names (views, not copies) to small values, for the tables loading builds
// once per name: the names claimed in a directory, the keys seen in a dict, the storages
// located in a zip.
//
// A checkpoint of 262,144 tensors asks such tables a million questions; with std::unordered_map
// each one chased a bucket, a heap node and the name. Here a question is one probe of a flat
// array (open addressing, linear probing) that holds each name's hash next to its view and
// value, so most answers never touch the name's bytes, and nothing is allocated per name.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace ckptfs {

template <class V>
class NameMap {
 public:
  // Room for |expected| names without growing (it still grows if more come).
  explicit NameMap(std::size_t expected = 0) { rehash(capacity_for(expected)); }

  // The value of |name|, or nullptr if it was never added. Valid until the next add().
  V* find(std::string_view name) {
    Slot& s = probe(name, hash_of(name));
    return s.used() ? &s.value : nullptr;
  }
  const V* find(std::string_view name) const {
    return const_cast<NameMap*>(this)->find(name);  // probing changes nothing
  }
  // Adds |name| (a view that must outlive the map, under 4 GiB) with |initial| if it is new;
  // returns its value either way (valid until the next add()), and in |added| whether it was
  // new.
  V& add(std::string_view name, const V& initial = V{}, bool* added = nullptr) {
    if (name.size() > std::numeric_limits<std::uint32_t>::max())
      throw std::length_error("NameMap: a name of 4 GiB or more");
    if (capacity_for(count_ + 1) > size_) rehash(size_ * 2);
    const std::uint32_t h = hash_of(name);
    Slot& s = probe(name, h);
    if (added != nullptr) *added = !s.used();
    if (!s.used()) {
      // A name's data pointer is never null once viewed here (an empty name is "" somewhere).
      s = Slot{name.data() != nullptr ? name.data() : "", static_cast<std::uint32_t>(name.size()),
               h, initial};
      ++count_;
    }
    return s.value;
  }
  std::size_t size() const { return count_; }
  // Room for |expected| names in all without growing.
  void reserve(std::size_t expected) {
    if (capacity_for(expected) > size_) rehash(capacity_for(expected));
  }

 private:
  // 24 bytes for the values used here (a name table is 2-4 slots per name, and loading
  // 262,144 tensors keeps four of them at once): the name as pointer and 32-bit length, the
  // low half of its hash.
  struct Slot {
    const char* data = nullptr;  // null: free
    std::uint32_t size = 0;
    std::uint32_t hash = 0;
    V value{};
    bool used() const { return data != nullptr; }
    std::string_view name() const { return {data, size}; }
  };

  // At most 3/4 full: short probe runs, and a table for 2^k names is 2^(k+1) slots, not 2^(k+2).
  static std::size_t capacity_for(std::size_t names) {
    return std::bit_ceil(names + names / 3 + 8);
  }

  static std::uint32_t hash_of(std::string_view name) {
    return static_cast<std::uint32_t>(std::hash<std::string_view>{}(name));
  }

  // The slot holding |name|, or the free slot where it would go.
  Slot& probe(std::string_view name, std::uint32_t h) {
    const std::size_t mask = size_ - 1;
    for (std::size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (!s.used() || (s.hash == h && s.name() == name)) return s;
    }
  }

  // The table comes from calloc: an all-zero Slot is a free one, and a large table is then
  // fresh zero pages that nobody writes before the first names land in them (a table for
  // 262,144 zip entries is 12 MB, and the thread that fills it is not the one that reserves it).
  static_assert(std::is_trivially_copyable_v<Slot> && std::is_trivially_destructible_v<Slot>);
  struct FreeSlots {
    void operator()(Slot* p) const { std::free(p); }
  };

  void rehash(std::size_t size) {
    std::unique_ptr<Slot[], FreeSlots> fresh(static_cast<Slot*>(std::calloc(size, sizeof(Slot))));
    if (!fresh) throw std::bad_alloc();
    std::unique_ptr<Slot[], FreeSlots> old = std::exchange(slots_, std::move(fresh));
    const std::size_t old_size = std::exchange(size_, size);
    for (std::size_t i = 0; i < old_size; ++i) {
      if (old[i].used()) probe(old[i].name(), old[i].hash) = old[i];
    }
  }

  std::unique_ptr<Slot[], FreeSlots> slots_;
  std::size_t size_ = 0;
  std::size_t count_ = 0;
};

}  // namespace ckptfs
