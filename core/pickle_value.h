// The value graph a pickle describes, built without executing anything.
//
// Values live in an arena and refer to each other by index: the memo makes the graph a DAG
// (and cycles are possible through objects under construction), so indices avoid both
// ownership cycles and per-node heap churn.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
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

// What an opcode builds, before the arena packs it into a Value (ValueArena::add). Only the
// fields of its kind are read: text for Str, Bytes, BigInt and Global (a view of
// ValueArena::keep()'s copy, never a temporary string); items for Tuple, List, Set, Dict and
// PersistentRef; cls and args for Object.
struct NewValue {
  ValueKind kind = ValueKind::None;
  bool boolean = false;
  std::int64_t integer = 0;
  double real = 0;
  std::string_view text;
  std::vector<ValueId> items;
  ValueId cls = kNoValue;
  ValueId args = kNoValue;
};

// A value as the arena keeps it. A checkpoint of 262,144 tensors builds about two million, and
// on these VMs loading costs what it touches of fresh memory: so a value is 32 bytes, its kind's
// fields sharing one union, and its text and items live in the arena's chunks (no heap block
// of their own). Reading a field another kind does not have gives what a default would (an
// empty text, no items, 0, kNoValue), never another kind's bytes.
class Value {
 public:
  ValueKind kind = ValueKind::None;
  bool boolean = false;  // Bool

  std::string_view text() const {
    return has_text(kind) ? std::string_view(u_.text, count_) : std::string_view();
  }
  std::span<const ValueId> items() const {
    return has_items(kind) ? std::span<const ValueId>(u_.list.data, count_)
                           : std::span<const ValueId>();
  }
  std::int64_t integer() const { return kind == ValueKind::Int ? u_.integer : 0; }
  double real() const { return kind == ValueKind::Float ? u_.real : 0.0; }
  // Object only: the callable or class, its argument tuple, BUILD state, and the items that
  // SETITEMS/APPENDS added to it (a Dict and a List value, created on demand).
  ValueId cls() const { return object_field(&Object::cls); }
  ValueId args() const { return object_field(&Object::args); }
  ValueId state() const { return object_field(&Object::state); }
  ValueId dict_items() const { return object_field(&Object::dict_items); }
  ValueId list_items() const { return object_field(&Object::list_items); }

  static constexpr bool has_text(ValueKind k) {
    return k == ValueKind::Str || k == ValueKind::Bytes || k == ValueKind::BigInt ||
           k == ValueKind::Global;
  }
  static constexpr bool has_items(ValueKind k) {
    return k == ValueKind::Tuple || k == ValueKind::List || k == ValueKind::Set ||
           k == ValueKind::Dict || k == ValueKind::PersistentRef;
  }

 private:
  friend class ValueArena;
  struct Object {
    ValueId cls, args, state, dict_items, list_items;
  };
  struct List {
    ValueId* data;
    std::uint32_t capacity;
  };
  ValueId object_field(ValueId Object::*field) const {
    return kind == ValueKind::Object ? u_.object.*field : kNoValue;
  }

  std::uint32_t count_ = 0;  // the text's bytes or the items' count
  union {
    std::int64_t integer = 0;
    double real;
    const char* text;
    List list;
    Object object;
  } u_;
};
static_assert(sizeof(Value) == 32);

class ValueArena {
 public:
  explicit ValueArena(std::size_t max_values = 32u << 20) : max_values_(max_values) {}

  // Throws FormatError when the limit is reached (a pickle bomb, not a checkpoint), or when a
  // text or item list is beyond 4 GiB.
  ValueId add(const NewValue& v);
  // A copy of |s| that lives as long as the arena (NUL-terminated), for NewValue::text: packed
  // into shared chunks, as the catalog keeps its names.
  std::string_view keep(std::string_view s) { return chunks_.add(s); }
  const Value& operator[](ValueId id) const { return values_[id]; }
  std::size_t size() const { return values_.size(); }
  void reserve(std::size_t n) { values_.reserve(std::min(n, max_values_)); }

  // The only changes a value sees after it is added (SETITEMS, APPENDS, ADDITEMS, BUILD):
  // items appended to a List, Set or Dict; an Object's state and item containers. Each is
  // ignored on a value of another kind (the reader checks kinds before it asks).
  void append_items(ValueId id, std::span<const ValueId> more);
  void set_state(ValueId object, ValueId state) {
    if (values_[object].kind == ValueKind::Object) values_[object].u_.object.state = state;
  }
  // The Dict (for |kind| Dict) or the List (for |kind| List) that SETITEMS / APPENDS on an
  // Object fill, created on first use; kNoValue for anything but an Object.
  ValueId object_items(ValueId object, ValueKind kind);

  bool is_global(ValueId id, std::string_view name) const {
    return id != kNoValue && values_[id].kind == ValueKind::Global && values_[id].text() == name;
  }

 private:
  std::vector<Value> values_;
  std::size_t max_values_;
  CatalogArena chunks_;  // texts and item lists
};

}  // namespace ckptfs
