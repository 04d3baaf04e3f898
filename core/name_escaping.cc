#include "name_escaping.h"

#include <fmt/format.h>

#include <cstdint>

namespace ckptfs {
namespace {

std::uint64_t fnv1a64(std::string_view s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace

std::string escape_name(std::string_view key) {
  if (key.empty()) return "%empty";
  if (key == ".") return "%2E";
  if (key == "..") return "%2E%2E";
  std::string out;
  out.reserve(key.size());
  for (char c : key) {
    if (c == '/') {
      out += "%2F";
    } else if (c == '%') {
      out += "%25";
    } else if (c == '\0') {
      out += "%00";
    } else {
      out.push_back(c);
    }
  }
  if (out.size() > kMaxBaseName) {
    std::string suffix = fmt::format("~{:016x}", fnv1a64(out));
    std::size_t keep = kMaxBaseName - suffix.size();
    // Do not cut inside a UTF-8 sequence or a %XX escape.
    while (keep > 0 && (static_cast<unsigned char>(out[keep]) & 0xC0) == 0x80) --keep;
    if (keep >= 1 && out[keep - 1] == '%')
      keep -= 1;
    else if (keep >= 2 && out[keep - 2] == '%')
      keep -= 2;
    out = out.substr(0, keep) + suffix;
  }
  return out;
}

}  // namespace ckptfs
