// The one rule that turns a checkpoint key into a file name (documented in docs/layout.md).
//
//  - '/' , '%' and NUL are percent-encoded (%2F, %25, %00); nothing else is touched, so the
//    rule is injective: a '%' in a name is always followed by two hex digits or by "empty".
//  - the empty key becomes "%empty"; "." and ".." become "%2E" and "%2E%2E".
//  - names longer than kMaxBaseName bytes keep their first bytes (cut at a UTF-8 boundary)
//    and end in "~" + 16 hex digits of a hash of the full escaped name, leaving room for the
//    ".json" sidecar suffix and a collision suffix within the 255-byte limit.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace ckptfs {

inline constexpr std::size_t kMaxBaseName = 230;

std::string escape_name(std::string_view key);

}  // namespace ckptfs
