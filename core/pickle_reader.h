// A pickle interpreter that only builds data (protocols 0-5, memo, framing).
//
// No callable is ever resolved or called: GLOBAL yields a name, REDUCE/NEWOBJ of a name yields
// an opaque Object holding its arguments. The only calls interpreted are pure data
// constructors (dict, OrderedDict, set, bytes via _codecs.encode, ...), so that containers
// look like containers. Every size and count is bounded; violations throw FormatError.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "errors.h"
#include "pickle_value.h"

namespace ckptfs {

// The pickle stopped in the middle: more input might complete it (legacy files are read from
// a prefix that grows until their pickles fit).
class TruncatedPickle : public FormatError {
 public:
  using FormatError::FormatError;
};

struct PickleLimits {
  std::size_t max_stack = 8u << 20;
  std::size_t max_marks = 1u << 16;
  std::size_t max_memo = 16u << 20;
};

class PickleReader {
 public:
  PickleReader(std::span<const std::byte> data, ValueArena& arena, PickleLimits limits = {});

  // Interprets opcodes up to and including STOP and returns the value left on the stack.
  ValueId read();

  // Offset just past the STOP of the last read() (legacy files concatenate pickles).
  std::size_t position() const { return pos_; }

 private:
  std::uint8_t next_byte();
  std::span<const std::byte> take(std::uint64_t n);
  std::string_view take_string(std::uint64_t n);  // a view of the pickle's bytes
  std::string take_line();
  template <typename T>
  T take_le();

  ValueId push_new(const NewValue& v);
  ValueId push_scalar(const NewValue& v);
  ValueId push_tuple(std::vector<ValueId> items);
  bool is_shared_scalar(ValueId id) const;
  void push(ValueId id);
  ValueId pop();
  ValueId top();
  std::vector<ValueId> pop_mark();
  ValueId make_global(std::string module, std::string name);
  ValueId make_int_from_le(std::span<const std::byte> bytes);
  ValueId call(ValueId callable, ValueId args, bool newobj);
  void set_items(ValueId target, std::span<const ValueId> kv);
  void append_items(ValueId target, std::span<const ValueId> items);
  void memo_put(std::uint64_t index, ValueId id);
  ValueId memo_get(std::uint64_t index);
  [[noreturn]] void fail(const std::string& what) const;
  [[noreturn]] void fail_truncated() const;

  std::span<const std::byte> data_;
  std::size_t pos_ = 0;
  std::size_t opcode_pos_ = 0;
  ValueArena& arena_;
  PickleLimits limits_;
  std::vector<ValueId> stack_;
  std::vector<std::size_t> marks_;
  std::vector<ValueId>
      memo_;  // by memo index; kNoValue = never stored (indices are dense in practice)
  std::size_t memo_count_ = 0;
  static constexpr std::int64_t kSmallIntBias = 1024;
  static constexpr std::int64_t kSmallIntLimit = 65536;
  std::vector<ValueId> small_ints_;  // shared Int values in [-kSmallIntBias, kSmallIntLimit)
  ValueId none_ = kNoValue;
  ValueId true_ = kNoValue;
  ValueId false_ = kNoValue;
  // Shared short tuples of shared scalars, by their items (unused slots kNoValue).
  static constexpr std::size_t kMaxSharedTuple = 4;
  struct TupleKeyHash {
    std::size_t operator()(const std::array<ValueId, kMaxSharedTuple>& k) const;
  };
  std::unordered_map<std::array<ValueId, kMaxSharedTuple>, ValueId, TupleKeyHash> shared_tuples_;
};

// Decimal digits of a little-endian two's-complement integer of any length.
std::string le_twos_complement_to_decimal(std::span<const std::byte> bytes);

}  // namespace ckptfs
