// CatalogArena: the bytes behind a catalog's names, texts, key paths and shapes.
//
// A checkpoint of 262,144 tensors has about a million file names and key parts. As separate
// std::strings and std::vectors each would be a heap block of its own (and a first touch of
// fresh memory on these VMs); here they are copied into large chunks that never move, and the
// catalog holds views into them. Nothing is ever freed on its own: the arena lives as long as
// the catalog, and moving either keeps every view valid.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace ckptfs {

class CatalogArena {
 public:
  CatalogArena() = default;
  CatalogArena(const CatalogArena&) = delete;
  CatalogArena& operator=(const CatalogArena&) = delete;
  // The chunks move, so views stay valid; the moved-from arena is empty (not left pointing
  // into chunks it no longer owns).
  CatalogArena(CatalogArena&& other) noexcept { *this = std::move(other); }
  CatalogArena& operator=(CatalogArena&& other) noexcept {
    chunks_ = std::move(other.chunks_);
    other.chunks_.clear();
    cursor_ = std::exchange(other.cursor_, nullptr);
    left_ = std::exchange(other.left_, 0);
    reserved_ = std::exchange(other.reserved_, 0);
    interned_text_ = std::move(other.interned_text_);
    other.interned_text_.clear();
    interned_arrays_ = std::move(other.interned_arrays_);
    other.interned_arrays_.clear();
    return *this;
  }

  // A copy of |s|, followed by a NUL (so a view's data() is also a C string).
  std::string_view add(std::string_view s) {
    char* p = static_cast<char*>(copy(s.data(), s.size(), s.size() + 1, 1));
    p[s.size()] = '\0';
    return {p, s.size()};
  }

  // A copy of |v| (trivially copyable elements only).
  template <class T>
  std::span<const T> add(std::span<const T> v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (v.empty()) return {};
    return {static_cast<const T*>(copy(v.data(), v.size_bytes(), v.size_bytes(), alignof(T))),
            v.size()};
  }

  // Room for |capacity| elements (at least |v|'s), the first v.size() copied from |v|: for an
  // array that grows (a pickle's list), which moves to a larger copy and leaves the old behind.
  template <class T>
  std::span<T> add_with_room(std::span<const T> v, std::size_t capacity) {
    static_assert(std::is_trivially_copyable_v<T>);
    return {static_cast<T*>(copy(v.data(), v.size_bytes(), capacity * sizeof(T), alignof(T))),
            capacity};
  }

  // Like add(), but equal contents share one copy: for values most tensors repeat (shapes,
  // strides, wrapper class names, storage locations).
  std::string_view intern(std::string_view s) {
    auto it = interned_text_.find(s);
    if (it != interned_text_.end()) return *it;
    std::string_view copy = add(s);
    interned_text_.insert(copy);
    return copy;
  }
  // Arrays are keyed by their bytes, apart from texts (whose copies need not be aligned).
  template <class T>
  std::span<const T> intern(std::span<const T> v) {
    static_assert(std::is_trivially_copyable_v<T> && alignof(T) <= kArrayAlign);
    std::string_view bytes(reinterpret_cast<const char*>(v.data()), v.size_bytes());
    auto it = interned_arrays_.find(bytes);
    if (it == interned_arrays_.end()) {
      const void* p = copy(bytes.data(), bytes.size(), bytes.size(), kArrayAlign);
      it = interned_arrays_.insert({static_cast<const char*>(p), bytes.size()}).first;
    }
    return {reinterpret_cast<const T*>(it->data()), v.size()};
  }

  // Drops the table behind intern() (the copies stay): a finished catalog adds nothing more.
  void stop_interning() {
    interned_text_ = {};
    interned_arrays_ = {};
  }

  std::size_t bytes_reserved() const { return reserved_; }

 private:
  static constexpr std::size_t kChunk = std::size_t{256} << 10;
  static constexpr std::size_t kArrayAlign = 8;

  static std::size_t padding(const std::byte* p, std::size_t align) {
    return (align - reinterpret_cast<std::uintptr_t>(p) % align) % align;
  }

  // |size| bytes aligned to |align|, the first |n| of them copied from |src|.
  void* copy(const void* src, std::size_t n, std::size_t size, std::size_t align) {
    void* p = allocate(size, align);
    if (n != 0) std::memcpy(p, src, n);
    return p;
  }

  void* allocate(std::size_t n, std::size_t align) {
    if (cursor_ == nullptr || padding(cursor_, align) + n > left_) {
      // Big items get a chunk of their own, so the current chunk's tail is not wasted.
      const bool own = n + align > kChunk / 4;
      const std::size_t size = own ? n + align : kChunk;
      chunks_.push_back(std::make_unique_for_overwrite<std::byte[]>(size));
      reserved_ += size;
      std::byte* start = chunks_.back().get();
      if (own) return start + padding(start, align);
      cursor_ = start;
      left_ = size;
    }
    std::byte* p = cursor_ + padding(cursor_, align);
    left_ -= static_cast<std::size_t>(p - cursor_) + n;
    cursor_ = p + n;
    return p;
  }

  std::vector<std::unique_ptr<std::byte[]>> chunks_;
  std::byte* cursor_ = nullptr;
  std::size_t left_ = 0;
  std::size_t reserved_ = 0;
  std::unordered_set<std::string_view> interned_text_;
  std::unordered_set<std::string_view> interned_arrays_;
};

}  // namespace ckptfs
