#include "name_map.h"

#include <catch2/catch.hpp>
#include <deque>
#include <string>

using NameTable = ckptfs::NameMap<std::uint8_t>;

TEST_CASE("name map finds what was added, with its flags, across growth") {
  NameTable names(1);             // far too small: it must grow many times
  std::deque<std::string> owned;  // the table keeps views
  for (int i = 0; i < 50'000; ++i) {
    owned.push_back("layer." + std::to_string(i) + ".weight");
    names.add(owned.back()) |= static_cast<std::uint8_t>(i % 7);
  }
  for (int i = 0; i < 50'000; ++i) {
    const std::uint8_t* f = names.find("layer." + std::to_string(i) + ".weight");
    REQUIRE(f != nullptr);
    CHECK(*f == i % 7);
  }
  CHECK(names.find("layer.50000.weight") == nullptr);
  CHECK(names.find("") == nullptr);
  CHECK(names.find("layer.1.weight.json") == nullptr);
}

TEST_CASE("add reports whether the name was new and keeps the first value") {
  ckptfs::NameMap<std::size_t> seen;
  bool added = false;
  CHECK(seen.add("a", 7, &added) == 7);
  CHECK(added);
  CHECK(seen.add("a", 9, &added) == 7);
  CHECK_FALSE(added);
  CHECK(seen.size() == 1);
}

TEST_CASE("adding a name twice keeps one entry and its flags") {
  NameTable names(4);
  names.add("w") |= 1;
  names.add("w") |= 4;
  REQUIRE(names.find("w") != nullptr);
  CHECK(*names.find("w") == 5);
  // The empty name is a name like any other.
  names.add("") |= 2;
  REQUIRE(names.find("") != nullptr);
  CHECK(*names.find("") == 2);
}
