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
#include <vector>

namespace ckptfs {

class CatalogArena {
 public:
  CatalogArena() = default;
  CatalogArena(const CatalogArena&) = delete;
  CatalogArena& operator=(const CatalogArena&) = delete;

  // A copy of |s|, followed by a NUL (so a view's data() is also a C string).
  std::string_view add(std::string_view s) {
    char* p = static_cast<char*>(allocate(s.size() + 1, 1));
    if (!s.empty()) std::memcpy(p, s.data(), s.size());
    p[s.size()] = '\0';
    return {p, s.size()};
  }

  // A copy of |v| (trivially copyable elements only).
  template <class T>
  std::span<const T> add(std::span<const T> v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (v.empty()) return {};
    T* p = static_cast<T*>(allocate(v.size_bytes(), alignof(T)));
    std::memcpy(p, v.data(), v.size_bytes());
    return {p, v.size()};
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
    static_assert(alignof(T) <= kArrayAlign);
    std::string_view bytes(reinterpret_cast<const char*>(v.data()), v.size_bytes());
    auto it = interned_arrays_.find(bytes);
    if (it == interned_arrays_.end()) {
      void* p = allocate(bytes.size(), kArrayAlign);
      if (!bytes.empty()) std::memcpy(p, bytes.data(), bytes.size());
      it = interned_arrays_.insert(std::string_view(static_cast<const char*>(p), bytes.size()))
               .first;
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
  static constexpr std::size_t kChunk = 256 * 1024;
  static constexpr std::size_t kArrayAlign = 8;

  void* allocate(std::size_t n, std::size_t align) {
    std::size_t pad = (align - reinterpret_cast<std::uintptr_t>(cursor_) % align) % align;
    if (cursor_ == nullptr || pad + n > left_) {
      // Big items get a chunk of their own, so the current chunk's tail is not wasted.
      std::size_t size = n + align > kChunk / 4 ? n + align : kChunk;
      chunks_.push_back(std::make_unique_for_overwrite<std::byte[]>(size));
      reserved_ += size;
      if (size != kChunk) {
        std::byte* own = chunks_.back().get();
        own += (align - reinterpret_cast<std::uintptr_t>(own) % align) % align;
        return own;
      }
      cursor_ = chunks_.back().get();
      left_ = size;
      pad = (align - reinterpret_cast<std::uintptr_t>(cursor_) % align) % align;
    }
    std::byte* p = cursor_ + pad;
    cursor_ = p + n;
    left_ -= pad + n;
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
