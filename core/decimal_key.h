// Storage keys that are plain numbers. torch numbers a checkpoint's storages 0, 1, 2, ..., so a
// table keyed by them can be an array indexed by the number: loading 262,144 tensors asked a
// hash table twice per storage, each time a probe that missed the cache.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace ckptfs {

// |text| as a number when it is the canonical decimal form of one (no sign, no leading zero)
// of at most nine digits: "07" and "7" are different keys and must never share a slot.
inline std::optional<std::uint32_t> canonical_decimal(std::string_view text) {
  if (text.empty() || text.size() > 9 || (text.size() > 1 && text[0] == '0')) return std::nullopt;
  std::uint32_t n = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<std::uint32_t>(c - '0');
  }
  return n;
}

}  // namespace ckptfs
