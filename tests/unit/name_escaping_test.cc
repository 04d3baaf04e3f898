#include "name_escaping.h"

#include <catch2/catch.hpp>
#include <set>

using namespace ckptfs;

TEST_CASE("names a filesystem cannot hold are escaped by one rule") {
  CHECK(escape_name("layer.0.weight") == "layer.0.weight");
  CHECK(escape_name("a/b") == "a%2Fb");
  CHECK(escape_name("100%") == "100%25");
  CHECK(escape_name("%2F") == "%252F");  // a literal escape sequence stays distinct
  CHECK(escape_name(std::string("a\0b", 3)) == "a%00b");
  CHECK(escape_name("") == "%empty");
  CHECK(escape_name(".") == "%2E");
  CHECK(escape_name("..") == "%2E%2E");
  CHECK(escape_name("...") == "...");
  CHECK(escape_name("w.json") == "w.json");
}

TEST_CASE("long names are shortened with a hash, stay valid UTF-8 and distinct") {
  std::set<std::string> seen;
  for (int i = 0; i < 50; ++i) {
    std::string key = std::string(300, 'x') + std::to_string(i);
    std::string n = escape_name(key);
    CHECK(n.size() <= kMaxBaseName);
    CHECK(n.size() + 5 + 4 <= 255);  // room for ".json" and a "~N" collision suffix
    seen.insert(n);
  }
  CHECK(seen.size() == 50);
  std::string snowmen;
  for (int i = 0; i < 120; ++i) snowmen += "\xe2\x98\x83/";  // 3-byte char then an escaped '/'
  std::string n = escape_name(snowmen);
  CHECK(n.size() <= kMaxBaseName);
  std::size_t tilde = n.rfind('~');
  REQUIRE(tilde != std::string::npos);
  std::string head = n.substr(0, tilde);
  // The cut never splits a UTF-8 sequence or a %XX escape.
  CHECK((head.size() >= 3 && (head.compare(head.size() - 3, 3, "%2F") == 0 ||
                              head.compare(head.size() - 3, 3, "\xe2\x98\x83") == 0)));
}
