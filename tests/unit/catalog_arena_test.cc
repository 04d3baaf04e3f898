#include "catalog_arena.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

using ckptfs::CatalogArena;

TEST_CASE("arena copies stay valid and unchanged as the arena grows") {
  auto owner = std::make_unique<CatalogArena>();  // as a catalog holds it
  CatalogArena& arena = *owner;
  std::vector<std::string> originals;
  std::vector<std::string_view> views;
  // Enough to fill many chunks, with one item bigger than a chunk in the middle.
  for (int i = 0; i < 100'000; ++i) {
    originals.push_back(i == 5000 ? std::string(1 << 20, 'x') : "name." + std::to_string(i));
    views.push_back(arena.add(originals.back()));
  }
  for (std::size_t i = 0; i < views.size(); ++i) {
    REQUIRE(views[i] == originals[i]);
    REQUIRE(views[i].data()[views[i].size()] == '\0');  // usable as a C string
  }
  CHECK(arena.bytes_reserved() >= (1u << 20));

  auto moved = std::move(owner);  // a moved catalog keeps its views
  CHECK(views[99'999] == "name.99999");
}

TEST_CASE("arrays are aligned for their type and interned copies are shared") {
  CatalogArena arena;
  arena.add(std::string_view("odd"));  // leaves the cursor unaligned
  const std::vector<std::int64_t> shape = {3, 4, 5};
  auto a = arena.add(std::span<const std::int64_t>(shape));
  CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % alignof(std::int64_t) == 0);
  CHECK(std::vector<std::int64_t>(a.begin(), a.end()) == shape);

  auto s1 = arena.intern(std::span<const std::int64_t>(shape));
  auto s2 = arena.intern(std::span<const std::int64_t>(std::vector<std::int64_t>{3, 4, 5}));
  auto s3 = arena.intern(std::span<const std::int64_t>(std::vector<std::int64_t>{3, 4}));
  CHECK(s1.data() == s2.data());
  CHECK(s3.data() != s1.data());
  CHECK(s3.size() == 2);
  CHECK(arena.intern(std::string_view("cpu")).data() ==
        arena.intern(std::string_view("cpu")).data());
  CHECK(arena.add(std::string_view("")).empty());

  // A text with the bytes of an array is not handed out as that (aligned) array.
  const std::vector<std::int64_t> two = {7, 8};
  std::string_view as_text(reinterpret_cast<const char*>(two.data()), 16);
  arena.add(std::string_view("x"));
  arena.intern(as_text);
  auto arr = arena.intern(std::span<const std::int64_t>(two));
  CHECK(reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(std::int64_t) == 0);
}

TEST_CASE("a moved arena keeps its views; the one moved from starts empty") {
  ckptfs::CatalogArena a;
  std::string_view kept = a.add(std::string_view("layer.0.weight"));
  ckptfs::CatalogArena b(std::move(a));
  CHECK(kept == "layer.0.weight");
  CHECK(b.bytes_reserved() > 0);
  // The moved-from state is documented, so using |a| again is the point here.
  // NOLINTBEGIN(bugprone-use-after-move,clang-analyzer-cplusplus.Move)
  CHECK(a.bytes_reserved() == 0);
  // Both go on allocating on their own: |a| takes a fresh chunk, not |b|'s.
  std::string_view in_a = a.add(std::string_view("a"));
  // NOLINTEND(bugprone-use-after-move,clang-analyzer-cplusplus.Move)
  std::string_view in_b = b.add(std::string_view("b"));
  CHECK(in_a.data() != in_b.data());
  CHECK(in_a == "a");
  CHECK(in_b == "b");
  CHECK(kept == "layer.0.weight");
  b = std::move(a);
  CHECK(in_a == "a");
  CHECK(b.bytes_reserved() > 0);
}
