// The value graph a pickle describes, built without executing anything.
//
// Values live in an arena and refer to each other by index: the memo makes the graph a DAG
// (and cycles are possible through objects under construction), so indices avoid both
// ownership cycles and per-node heap churn.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "catalog_arena.h"

namespace ckptfs {

using ValueId = std::uint32_t;
inline constexpr ValueId kNoValue = std::numeric_limits<ValueId>::max();

enum class ValueKind : std::uint8_t {
  None,
  Bool,
  Int,     // fits int64: |integer|
  BigInt,  // does not fit int64: |text| holds its decimal digits (with a leading '-')
  Float,
  Str,     // |text| is UTF-8 as pickled (lone surrogates may appear, as Python's surrogatepass)
  Bytes,   // |text| holds the raw bytes
  Tuple,   // |items|
  List,    // |items|
  Set,     // |items|
  Dict,    // |items| = key0, value0, key1, value1, ... in insertion order
  Global,  // |text| = canonical "module.name" (Python 2 names mapped to Python 3)
  Object,  // REDUCE/NEWOBJ/INST of anything that is not a plain data constructor
  PersistentRef,  // BINPERSID: |items|[0] is the persistent id
};

// A checkpoint of 262,144 tensors builds about two million of these: the fields are ordered
// to pack into 72 bytes, and a text is a view of the arena's copy (ValueArena::keep), not a
// string of its own (a heap block for any text over 15 bytes, such as most tensor keys).
struct Value {
  ValueKind kind = ValueKind::None;
  bool boolean = false;
  // Object only: the callable or class, its argument tuple, BUILD state, and the items that
  // SETITEMS/APPENDS added to it (a Dict and a List value, created on demand).
  ValueId cls = kNoValue;
  ValueId args = kNoValue;
  ValueId state = kNoValue;
  ValueId dict_items = kNoValue;
  ValueId list_items = kNoValue;
  union {
    std::int64_t integer = 0;  // Int
    double real;               // Float
  };
  // Str, Bytes, BigInt, Global: the bytes, kept by the arena (assign ValueArena::keep()'s
  // result; never a temporary string).
  std::string_view text;
  std::vector<ValueId> items;
};
static_assert(sizeof(Value) == 72);

class ValueArena {
 public:
  explicit ValueArena(std::size_t max_values = 32u << 20) : max_values_(max_values) {}

  // Throws FormatError when the limit is reached (a pickle bomb, not a checkpoint).
  ValueId add(Value v);
  // A copy of |s| that lives as long as the arena (NUL-terminated), for Value::text: packed
  // into shared chunks, as the catalog keeps its names.
  std::string_view keep(std::string_view s) { return texts_.add(s); }
  Value& operator[](ValueId id) { return values_[id]; }
  const Value& operator[](ValueId id) const { return values_[id]; }
  std::size_t size() const { return values_.size(); }
  void reserve(std::size_t n) { values_.reserve(std::min(n, max_values_)); }

  bool is_global(ValueId id, std::string_view name) const {
    return id != kNoValue && values_[id].kind == ValueKind::Global && values_[id].text == name;
  }

 private:
  std::vector<Value> values_;
  std::size_t max_values_;
  CatalogArena texts_;
};

}  // namespace ckptfs
