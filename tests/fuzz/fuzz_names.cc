// libFuzzer target: the key -> file name rule. Properties, not just "no crash": every name is a
// legal, non-special POSIX file name within the length budget, and the rule is injective
// for keys that are never cut (two of them never share a name), on the two halves of the input.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "name_escaping.h"

namespace {

void check_name(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.size() > ckptfs::kMaxBaseName ||
      name.find('/') != std::string::npos || name.find('\0') != std::string::npos) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  std::string_view a = all.substr(0, size / 2);
  std::string_view b = all.substr(size / 2);
  std::string ea = ckptfs::escape_name(a);
  std::string eb = ckptfs::escape_name(b);
  check_name(ea);
  check_name(eb);
  // Keys short enough never to be cut (at most 3 bytes per byte escaped) must not collide.
  // Cut names can collide by construction (a key equal to another key's cut name); the
  // catalog resolves any clash with a ~N suffix, so only the uncut rule must be injective.
  constexpr std::size_t kNeverCut = ckptfs::kMaxBaseName / 3;
  if (a.size() <= kNeverCut && b.size() <= kNeverCut && a != b && ea == eb) std::abort();
  if (ckptfs::escape_name(a) != ea) std::abort();  // deterministic
  return 0;
}
