#include "pickle_reader.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>

#include "errors.h"
#include "little_endian.h"

namespace ckptfs {

// A Value counts its text's bytes and its items in 32 bits.
constexpr std::size_t kMaxCount = std::numeric_limits<std::uint32_t>::max();

ValueId ValueArena::add(const NewValue& v) {
  if (values_.size() >= max_values_) {
    throw FormatError(
        fmt::format("pickle builds more than {} objects (refused as a bomb)", max_values_));
  }
  Value out;
  out.kind = v.kind;
  out.boolean = v.boolean;
  if (Value::has_text(v.kind)) {
    if (v.text.size() > kMaxCount) throw FormatError("pickle holds a text of 4 GiB or more");
    out.u_.text = v.text.data();
    out.count_ = static_cast<std::uint32_t>(v.text.size());
  } else if (Value::has_items(v.kind)) {
    if (v.items.size() > kMaxCount) throw FormatError("pickle holds 4 billion items or more");
    out.u_.list = {nullptr, 0};
    if (!v.items.empty()) {
      auto room = chunks_.add_with_room(std::span<const ValueId>(v.items), v.items.size());
      out.u_.list = {room.data(), static_cast<std::uint32_t>(v.items.size())};
    }
    out.count_ = static_cast<std::uint32_t>(v.items.size());
  } else if (v.kind == ValueKind::Int) {
    out.u_.integer = v.integer;
  } else if (v.kind == ValueKind::Float) {
    out.u_.real = v.real;
  } else if (v.kind == ValueKind::Object) {
    out.u_.object = {v.cls, v.args, kNoValue, kNoValue, kNoValue};
  }
  values_.push_back(out);
  return static_cast<ValueId>(values_.size() - 1);
}

void ValueArena::append_items(ValueId id, std::span<const ValueId> more) {
  Value& v = values_[id];
  // Never a Tuple: a shared tuple stands for every equal one.
  if ((v.kind != ValueKind::List && v.kind != ValueKind::Set && v.kind != ValueKind::Dict) ||
      more.empty())
    return;
  const std::size_t n = std::size_t{v.count_} + more.size();
  if (n > kMaxCount) throw FormatError("pickle holds 4 billion items or more");
  if (n > v.u_.list.capacity) {
    // Doubling: a list APPENDed item by item moves O(log n) times; what it leaves behind in
    // the chunks is less than its final size.
    const std::size_t room =
        std::min(kMaxCount, std::max({n, 2 * std::size_t{v.u_.list.capacity}, std::size_t{4}}));
    auto moved = chunks_.add_with_room(std::span<const ValueId>(v.u_.list.data, v.count_), room);
    v.u_.list = {moved.data(), static_cast<std::uint32_t>(room)};
  }
  std::copy(more.begin(), more.end(), v.u_.list.data + v.count_);
  v.count_ = static_cast<std::uint32_t>(n);
}

ValueId ValueArena::object_items(ValueId object, ValueKind kind) {
  if (values_[object].kind != ValueKind::Object) return kNoValue;
  ValueId Value::Object::*field =
      kind == ValueKind::Dict ? &Value::Object::dict_items : &Value::Object::list_items;
  if (values_[object].u_.object.*field == kNoValue) {
    NewValue container;
    container.kind = kind;
    const ValueId id = add(container);
    values_[object].u_.object.*field = id;  // re-indexed: add() may have moved the values
  }
  return values_[object].u_.object.*field;
}

namespace {

void append_utf8(std::string& out, std::uint32_t cp) {
  // Surrogates are encoded like any other code point (Python's surrogatepass).
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes UTF-8 (surrogates allowed) into code points; false on malformed input.
bool decode_utf8(std::string_view s, std::vector<std::uint32_t>& out) {
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + static_cast<std::size_t>(len) > s.size()) {
      return false;
    }
    std::uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if ((cc >> 6) != 0x2) {
        return false;
      }
      cp = (cp << 6) | (cc & 0x3F);
    }
    out.push_back(cp);
    i += static_cast<std::size_t>(len);
  }
  return true;
}

// Python 2 module and class names that Python 3's pickler writes at protocol < 3
// (_compat_pickle), mapped back to the Python 3 spelling.
std::pair<std::string, std::string> canonical_global(std::string module, std::string name) {
  if (module == "__builtin__") {
    module = "builtins";
    if (name == "unicode" || name == "basestring")
      name = "str";
    else if (name == "long")
      name = "int";
    else if (name == "xrange")
      name = "range";
  } else if (module == "copy_reg") {
    module = "copyreg";
  } else if (module == "torch.tensor") {
    module = "torch._tensor";  // torch's own rename for old _rebuild_from_type_v2 pickles
  }
  return {std::move(module), std::move(name)};
}

std::string decode_raw_unicode_escape(std::string_view in) {
  std::string out;
  for (std::size_t i = 0; i < in.size(); ++i) {
    auto c = static_cast<unsigned char>(in[i]);
    if (c == '\\' && i + 1 < in.size() && (in[i + 1] == 'u' || in[i + 1] == 'U')) {
      std::size_t digits = in[i + 1] == 'u' ? 4 : 8;
      if (i + 2 + digits <= in.size()) {
        std::uint32_t cp = 0;
        auto r = std::from_chars(in.data() + i + 2, in.data() + i + 2 + digits, cp, 16);
        if (r.ec == std::errc() && r.ptr == in.data() + i + 2 + digits && cp <= 0x10FFFF) {
          append_utf8(out, cp);
          i += 1 + digits;
          continue;
        }
      }
    }
    append_utf8(out, c);  // everything else is latin-1
  }
  return out;
}

// Decodes the body of a protocol-0 STRING opcode: a Python repr in quotes.
std::string decode_python_string_literal(std::string_view line) {
  if (line.size() < 2 || (line.front() != '\'' && line.front() != '"') ||
      line.back() != line.front()) {
    throw FormatError("pickle STRING opcode without matching quotes");
  }
  std::string_view s = line.substr(1, line.size() - 2);
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    char e = s[++i];
    switch (e) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'r':
        out.push_back('\r');
        break;
      case 'a':
        out.push_back('\a');
        break;
      case 'b':
        out.push_back('\b');
        break;
      case 'f':
        out.push_back('\f');
        break;
      case 'v':
        out.push_back('\v');
        break;
      case 'x': {
        unsigned v = 0;
        if (i + 2 < s.size() + 0 &&
            std::from_chars(s.data() + i + 1, s.data() + i + 3, v, 16).ec == std::errc()) {
          out.push_back(static_cast<char>(v));
          i += 2;
        } else {
          throw FormatError("pickle STRING opcode with a bad \\x escape");
        }
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          unsigned v = static_cast<unsigned>(e - '0');
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) {
            v = v * 8 + static_cast<unsigned>(s[++i] - '0');
          }
          out.push_back(static_cast<char>(v & 0xFF));
        } else {
          out.push_back(e);  // \\, \', \" and unknown escapes keep the character
        }
    }
  }
  return out;
}

bool parse_int64(std::string_view s, std::int64_t& out) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  auto r = std::from_chars(s.data(), s.data() + s.size(), out, 10);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

}  // namespace

std::string le_twos_complement_to_decimal(std::span<const std::byte> bytes) {
  std::vector<std::uint8_t> mag(bytes.size());
  for (std::size_t i = 0; i < bytes.size(); ++i) mag[i] = static_cast<std::uint8_t>(bytes[i]);
  bool negative = !mag.empty() && (mag.back() & 0x80) != 0;
  if (negative) {  // magnitude = two's complement negation
    unsigned carry = 1;
    for (auto& b : mag) {
      unsigned v = static_cast<unsigned>(static_cast<std::uint8_t>(~b)) + carry;
      b = static_cast<std::uint8_t>(v & 0xFF);
      carry = v >> 8;
    }
  }
  std::string digits;
  while (std::any_of(mag.begin(), mag.end(), [](std::uint8_t b) { return b != 0; })) {
    unsigned rem = 0;
    for (std::size_t i = mag.size(); i-- > 0;) {
      unsigned cur = (rem << 8) | mag[i];
      mag[i] = static_cast<std::uint8_t>(cur / 10);
      rem = cur % 10;
    }
    digits.push_back(static_cast<char>('0' + rem));
  }
  if (digits.empty()) digits = "0";
  if (negative) digits.push_back('-');
  std::reverse(digits.begin(), digits.end());
  return digits;
}

PickleReader::PickleReader(std::span<const std::byte> data, ValueArena& arena, PickleLimits limits)
    : data_(data), arena_(arena), limits_(limits) {}

void PickleReader::fail(const std::string& what) const {
  throw FormatError(fmt::format("corrupt pickle at byte {}: {}", opcode_pos_, what));
}

void PickleReader::fail_truncated() const {
  throw TruncatedPickle(
      fmt::format("corrupt pickle at byte {}: unexpected end of data", opcode_pos_));
}

std::uint8_t PickleReader::next_byte() {
  if (pos_ >= data_.size()) fail_truncated();
  return static_cast<std::uint8_t>(data_[pos_++]);
}

std::span<const std::byte> PickleReader::take(std::uint64_t n) {
  if (n > data_.size() - pos_) fail_truncated();
  auto s = data_.subspan(pos_, n);
  pos_ += n;
  return s;
}

std::string_view PickleReader::take_string(std::uint64_t n) {
  auto s = take(n);
  return {reinterpret_cast<const char*>(s.data()), s.size()};
}

std::string PickleReader::take_line() {
  auto begin = data_.begin() + static_cast<std::ptrdiff_t>(pos_);
  auto nl = std::find(begin, data_.end(), std::byte{'\n'});
  if (nl == data_.end()) fail_truncated();
  std::string line(reinterpret_cast<const char*>(&*begin), static_cast<std::size_t>(nl - begin));
  pos_ += line.size() + 1;
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return line;
}

template <typename T>
T PickleReader::take_le() {
  return load_le<T>(take(sizeof(T)).data());
}

// None, booleans and small ints are immutable: one shared value each. Checkpoints are full
// of them (offsets, shapes, strides, requires_grad), a third of all values otherwise.
ValueId PickleReader::push_scalar(const NewValue& v) {
  ValueId* slot = nullptr;
  if (v.kind == ValueKind::None) {
    slot = &none_;
  } else if (v.kind == ValueKind::Bool) {
    slot = v.boolean ? &true_ : &false_;
  } else if (v.kind == ValueKind::Int && v.integer >= -kSmallIntBias &&
             v.integer < kSmallIntLimit) {
    if (small_ints_.empty()) small_ints_.assign(kSmallIntBias + kSmallIntLimit, kNoValue);
    slot = &small_ints_[static_cast<std::size_t>(v.integer + kSmallIntBias)];
  }
  if (slot == nullptr) return push_new(v);
  if (*slot == kNoValue) *slot = arena_.add(v);
  push(*slot);
  return *slot;
}

bool PickleReader::is_shared_scalar(ValueId id) const {
  const Value& v = arena_[id];
  switch (v.kind) {
    case ValueKind::None:
      return id == none_;
    case ValueKind::Bool:
      return id == true_ || id == false_;
    case ValueKind::Int:
      return v.integer() >= -kSmallIntBias && v.integer() < kSmallIntLimit &&
             !small_ints_.empty() &&
             small_ints_[static_cast<std::size_t>(v.integer() + kSmallIntBias)] == id;
    default:
      return false;
  }
}

std::size_t PickleReader::TupleKeyHash::operator()(
    const std::array<ValueId, kMaxSharedTuple>& k) const {
  std::uint64_t h = 0x9E3779B97F4A7C15u;
  for (ValueId id : k) h = (h ^ id) * 0x100000001B3u;
  return static_cast<std::size_t>(h ^ (h >> 29));
}

// Tuples are immutable (no opcode changes one: SETITEMS, APPENDS, ADDITEMS and BUILD refuse or
// ignore them), so equal short tuples of shared scalars can be one value. Every tensor pickles
// a shape, a stride and an empty hooks tuple that are mostly alike: without this they are 30 %
// of a many-tensor checkpoint's values.
ValueId PickleReader::push_tuple(std::vector<ValueId> items) {
  std::array<ValueId, kMaxSharedTuple> key;
  key.fill(kNoValue);
  bool shareable = items.size() <= kMaxSharedTuple;
  for (std::size_t i = 0; shareable && i < items.size(); ++i) {
    shareable = is_shared_scalar(items[i]);
    key[i] = items[i];
  }
  if (shareable) {
    if (auto it = shared_tuples_.find(key); it != shared_tuples_.end()) {
      push(it->second);
      return it->second;
    }
  }
  NewValue v;
  v.kind = ValueKind::Tuple;
  v.items = std::move(items);
  ValueId id = push_new(v);
  if (shareable) shared_tuples_.emplace(key, id);
  return id;
}

ValueId PickleReader::push_new(const NewValue& v) {
  ValueId id = arena_.add(v);
  push(id);
  return id;
}

void PickleReader::push(ValueId id) {
  if (stack_.size() >= limits_.max_stack) fail("stack too deep");
  stack_.push_back(id);
}

ValueId PickleReader::pop() {
  std::size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) fail("stack underflow");
  ValueId id = stack_.back();
  stack_.pop_back();
  return id;
}

ValueId PickleReader::top() {
  std::size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) fail("stack underflow");
  return stack_.back();
}

std::vector<ValueId> PickleReader::pop_mark() {
  if (marks_.empty()) fail("no MARK on the stack");
  std::size_t m = marks_.back();
  marks_.pop_back();
  std::vector<ValueId> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
  stack_.resize(m);
  return items;
}

ValueId PickleReader::make_global(std::string module, std::string name) {
  auto [m, n] = canonical_global(std::move(module), std::move(name));
  NewValue v;
  v.kind = ValueKind::Global;
  v.text = arena_.keep(m + "." + n);
  return arena_.add(v);
}

ValueId PickleReader::make_int_from_le(std::span<const std::byte> bytes) {
  NewValue v;
  if (bytes.size() <= 8) {
    std::uint64_t u = 0;
    for (std::size_t i = 0; i < bytes.size(); ++i)
      u |= std::uint64_t(static_cast<std::uint8_t>(bytes[i])) << (8 * i);
    if (!bytes.empty() && bytes.size() < 8 && (static_cast<std::uint8_t>(bytes.back()) & 0x80)) {
      u |= ~std::uint64_t{0} << (8 * bytes.size());  // sign-extend
    }
    v.kind = ValueKind::Int;
    v.integer = static_cast<std::int64_t>(u);
  } else {
    v.kind = ValueKind::BigInt;
    v.text = arena_.keep(le_twos_complement_to_decimal(bytes));
    std::int64_t small = 0;
    if (parse_int64(v.text, small)) {
      v.kind = ValueKind::Int;
      v.integer = small;
      v.text = {};
    }
  }
  return arena_.add(v);
}

// REDUCE and NEWOBJ. Plain data constructors are interpreted; everything else stays opaque.
ValueId PickleReader::call(ValueId callable, ValueId args, bool newobj) {
  const Value& c = arena_[callable];
  const Value& a = arena_[args];
  // The arena's chunks: the values may move as more are added, their items do not (nothing
  // appends to |a| here).
  const std::span<const ValueId> argv = a.kind == ValueKind::Tuple || a.kind == ValueKind::List
                                            ? a.items()
                                            : std::span<const ValueId>();
  if (c.kind == ValueKind::Global) {
    const std::string_view name = c.text();  // the arena's bytes: |c| may move, they do not
    if (name == "collections.OrderedDict" || name == "builtins.dict" ||
        name == "collections.Counter" || name == "collections.defaultdict") {
      NewValue d;
      d.kind = ValueKind::Dict;
      // defaultdict's first argument is the default factory, not content.
      std::size_t content = name == "collections.defaultdict" ? 1 : 0;
      if (!newobj && argv.size() > content) {
        const Value& src = arena_[argv[content]];
        if (src.kind == ValueKind::Dict) {
          d.items.assign(src.items().begin(), src.items().end());
        } else if (src.kind == ValueKind::List || src.kind == ValueKind::Tuple) {
          for (ValueId pair : src.items()) {
            const Value& p = arena_[pair];
            if ((p.kind == ValueKind::Tuple || p.kind == ValueKind::List) &&
                p.items().size() == 2) {
              d.items.push_back(p.items()[0]);
              d.items.push_back(p.items()[1]);
            }
          }
        }
      }
      return arena_.add(d);
    }
    if (name == "builtins.set" || name == "builtins.frozenset" || name == "builtins.list" ||
        name == "builtins.tuple") {
      NewValue s;
      s.kind = name == "builtins.list"    ? ValueKind::List
               : name == "builtins.tuple" ? ValueKind::Tuple
                                          : ValueKind::Set;
      if (!argv.empty()) {
        const Value& src = arena_[argv[0]];
        if (src.kind == ValueKind::List || src.kind == ValueKind::Tuple ||
            src.kind == ValueKind::Set) {
          s.items.assign(src.items().begin(), src.items().end());
        }
      }
      return arena_.add(s);
    }
    if (!newobj &&
        (name == "_codecs.encode" || name == "builtins.bytes" || name == "builtins.bytearray")) {
      NewValue b;
      b.kind = ValueKind::Bytes;
      if (argv.empty()) return arena_.add(b);
      const Value& src = arena_[argv[0]];
      if (src.kind == ValueKind::Bytes) {
        b.text = src.text();
        return arena_.add(b);
      }
      if (src.kind == ValueKind::Str && argv.size() == 2 &&
          arena_[argv[1]].kind == ValueKind::Str &&
          (arena_[argv[1]].text() == "latin1" || arena_[argv[1]].text() == "latin-1")) {
        std::vector<std::uint32_t> cps;
        if (decode_utf8(src.text(), cps) &&
            std::all_of(cps.begin(), cps.end(), [](std::uint32_t cp) { return cp < 256; })) {
          std::string latin1;
          for (auto cp : cps) latin1.push_back(static_cast<char>(cp));
          b.text = arena_.keep(latin1);
          return arena_.add(b);
        }
      }
      // Anything else (other encodings, odd arguments) stays an opaque call.
    }
  }
  NewValue o;
  o.kind = ValueKind::Object;
  o.cls = callable;
  o.args = args;
  return arena_.add(o);
}

void PickleReader::set_items(ValueId target, std::span<const ValueId> kv) {
  if (kv.size() % 2 != 0) fail("SETITEMS with an odd number of items");
  if (arena_[target].kind == ValueKind::Object)
    target = arena_.object_items(target, ValueKind::Dict);
  if (arena_[target].kind != ValueKind::Dict) fail("SETITEM on something that is not a dict");
  arena_.append_items(target, kv);
}

void PickleReader::append_items(ValueId target, std::span<const ValueId> items) {
  if (arena_[target].kind == ValueKind::Object)
    target = arena_.object_items(target, ValueKind::List);
  if (arena_[target].kind != ValueKind::List && arena_[target].kind != ValueKind::Set)
    fail("APPEND on something that is not a list");
  arena_.append_items(target, items);
}

void PickleReader::memo_put(std::uint64_t index, ValueId id) {
  // Python's pickler numbers memo entries densely, so an index far beyond the entries stored so
  // far is a bomb (a 10-byte pickle asking for a 64 MiB memo), not a checkpoint. (Not the count
  // of values: shared tuples are memoized again and again as one value.)
  if (index >= limits_.max_memo || index > memo_count_ + 65536)
    fail(fmt::format("memo index {} is too large", index));
  if (index >= memo_.size()) memo_.resize(index + 1, kNoValue);
  if (memo_[index] == kNoValue) ++memo_count_;
  memo_[index] = id;
}

ValueId PickleReader::memo_get(std::uint64_t index) {
  if (index >= memo_.size() || memo_[index] == kNoValue)
    fail(fmt::format("memo key {} was never stored", index));
  return memo_[index];
}

ValueId PickleReader::read() {
  stack_.clear();
  marks_.clear();
  memo_.clear();
  memo_count_ = 0;
  // Roughly one value per 3 bytes of pickle, and at most one memo entry per byte (MEMOIZE):
  // reserve once instead of growing by copies. Only what is used is ever touched.
  arena_.reserve(arena_.size() + (data_.size() - pos_) / 3);
  memo_.reserve(std::min(data_.size() - pos_, limits_.max_memo));
  for (;;) {
    opcode_pos_ = pos_;
    std::uint8_t op = next_byte();
    switch (op) {
      case 0x80: {  // PROTO
        std::uint8_t proto = next_byte();
        if (proto > 5) fail(fmt::format("unsupported pickle protocol {}", proto));
        break;
      }
      case 0x95: {  // FRAME: a read-ahead hint, but one that must fit, as Python checks too
        auto frame = take_le<std::uint64_t>();
        if (frame > data_.size() - pos_) fail_truncated();
        break;
      }
      case '.': {  // STOP
        ValueId result = pop();
        return result;
      }
      case '(':  // MARK
        if (marks_.size() >= limits_.max_marks) fail("too many nested MARKs");
        marks_.push_back(stack_.size());
        break;
      case '0':  // POP
        if (!marks_.empty() && stack_.size() == marks_.back()) {
          marks_.pop_back();  // CPython pops the mark when the stack top is a mark
        } else {
          pop();
        }
        break;
      case '1':  // POP_MARK
        pop_mark();
        break;
      case '2':  // DUP
        push(top());
        break;
      case 'N':
        push_scalar(NewValue{});
        break;
      case 0x88:
      case 0x89: {  // NEWTRUE / NEWFALSE
        NewValue v;
        v.kind = ValueKind::Bool;
        v.boolean = op == 0x88;
        push_scalar(v);
        break;
      }
      case 'I': {  // INT (text); "00"/"01" are protocol-0 booleans
        std::string line = take_line();
        NewValue v;
        if (line == "00" || line == "01") {
          v.kind = ValueKind::Bool;
          v.boolean = line == "01";
        } else {
          v.kind = ValueKind::Int;
          if (!parse_int64(line, v.integer)) fail("bad INT literal");
        }
        push_scalar(v);
        break;
      }
      case 'L': {  // LONG (text)
        std::string line = take_line();
        if (!line.empty() && line.back() == 'L') line.pop_back();
        NewValue v;
        v.kind = ValueKind::Int;
        if (!parse_int64(line, v.integer)) {
          std::string_view digits = line;
          bool neg = !digits.empty() && digits.front() == '-';
          if (neg || (!digits.empty() && digits.front() == '+')) digits.remove_prefix(1);
          if (digits.empty() || !std::all_of(digits.begin(), digits.end(),
                                             [](char ch) { return ch >= '0' && ch <= '9'; })) {
            fail("bad LONG literal");
          }
          v.kind = ValueKind::BigInt;
          v.text = arena_.keep((neg ? "-" : "") + std::string(digits));
        }
        push_new(v);
        break;
      }
      case 'J': {
        NewValue v;
        v.kind = ValueKind::Int;
        v.integer = static_cast<std::int32_t>(take_le<std::uint32_t>());
        push_scalar(v);
        break;
      }
      case 'K':
      case 'M': {
        NewValue v;
        v.kind = ValueKind::Int;
        v.integer = op == 'K' ? take_le<std::uint8_t>() : take_le<std::uint16_t>();
        push_scalar(v);
        break;
      }
      case 0x8a:
        push(make_int_from_le(take(take_le<std::uint8_t>())));
        break;
      case 0x8b: {
        auto n = static_cast<std::int32_t>(take_le<std::uint32_t>());
        if (n < 0) fail("negative LONG4 length");
        push(make_int_from_le(take(static_cast<std::uint64_t>(n))));
        break;
      }
      case 'F': {  // FLOAT (text)
        std::string line = take_line();
        NewValue v;
        v.kind = ValueKind::Float;
        auto r = std::from_chars(line.data(), line.data() + line.size(), v.real);
        if (r.ec != std::errc() || r.ptr != line.data() + line.size()) fail("bad FLOAT literal");
        push_new(v);
        break;
      }
      case 'G': {  // BINFLOAT: big-endian IEEE double
        std::uint64_t bits = 0;
        for (std::byte b : take(8)) bits = (bits << 8) | static_cast<std::uint8_t>(b);
        NewValue v;
        v.kind = ValueKind::Float;
        v.real = std::bit_cast<double>(bits);
        push_new(v);
        break;
      }
      case 'S': {  // STRING (Python 2 str, decoded as UTF-8 like torch.load's default)
        NewValue v;
        v.kind = ValueKind::Str;
        v.text = arena_.keep(decode_python_string_literal(take_line()));
        push_new(v);
        break;
      }
      case 'T':
      case 'U': {  // BINSTRING / SHORT_BINSTRING
        std::uint64_t n = op == 'U' ? take_le<std::uint8_t>() : take_le<std::uint32_t>();
        NewValue v;
        v.kind = ValueKind::Str;
        v.text = arena_.keep(take_string(n));
        push_new(v);
        break;
      }
      case 'V': {  // UNICODE (raw-unicode-escape text)
        NewValue v;
        v.kind = ValueKind::Str;
        v.text = arena_.keep(decode_raw_unicode_escape(take_line()));
        push_new(v);
        break;
      }
      case 'X':
      case 0x8c:
      case 0x8d: {  // BINUNICODE / SHORT_BINUNICODE / BINUNICODE8
        std::uint64_t n = op == 0x8c  ? take_le<std::uint8_t>()
                          : op == 'X' ? take_le<std::uint32_t>()
                                      : take_le<std::uint64_t>();
        NewValue v;
        v.kind = ValueKind::Str;
        v.text = arena_.keep(take_string(n));
        push_new(v);
        break;
      }
      case 'B':
      case 'C':
      case 0x8e:
      case 0x96: {  // BINBYTES / SHORT_BINBYTES / BINBYTES8 / BYTEARRAY8
        std::uint64_t n = op == 'C'   ? take_le<std::uint8_t>()
                          : op == 'B' ? take_le<std::uint32_t>()
                                      : take_le<std::uint64_t>();
        NewValue v;
        v.kind = ValueKind::Bytes;
        v.text = arena_.keep(take_string(n));
        push_new(v);
        break;
      }
      case ')':
      case ']':
      case '}':
      case 0x8f: {  // EMPTY_TUPLE / EMPTY_LIST / EMPTY_DICT / EMPTY_SET
        if (op == ')') {
          push_tuple({});
          break;
        }
        NewValue v;
        v.kind = op == ']' ? ValueKind::List : op == '}' ? ValueKind::Dict : ValueKind::Set;
        push_new(v);
        break;
      }
      case 't':
      case 'l':
      case 0x91: {  // TUPLE / LIST / FROZENSET
        if (op == 't') {
          push_tuple(pop_mark());
          break;
        }
        NewValue v;
        v.kind = op == 'l' ? ValueKind::List : ValueKind::Set;
        v.items = pop_mark();
        push_new(v);
        break;
      }
      case 0x85:
      case 0x86:
      case 0x87: {  // TUPLE1..3
        std::size_t n = static_cast<std::size_t>(op - 0x84);
        std::vector<ValueId> items(n);
        for (std::size_t i = n; i-- > 0;) items[i] = pop();
        push_tuple(std::move(items));
        break;
      }
      case 'd': {  // DICT
        NewValue v;
        v.kind = ValueKind::Dict;
        v.items = pop_mark();
        if (v.items.size() % 2 != 0) fail("DICT with an odd number of items");
        push_new(v);
        break;
      }
      case 's': {  // SETITEM
        ValueId value = pop();
        ValueId key = pop();
        const ValueId kv[2] = {key, value};
        set_items(top(), kv);
        break;
      }
      case 'u': {  // SETITEMS
        auto kv = pop_mark();
        set_items(top(), kv);
        break;
      }
      case 'a': {  // APPEND
        ValueId item = pop();
        append_items(top(), std::span<const ValueId>(&item, 1));
        break;
      }
      case 'e': {  // APPENDS
        auto items = pop_mark();
        append_items(top(), items);
        break;
      }
      case 0x90: {  // ADDITEMS
        auto items = pop_mark();
        ValueId target = top();
        if (arena_[target].kind != ValueKind::Set) fail("ADDITEMS on something that is not a set");
        arena_.append_items(target, items);
        break;
      }
      case 'c': {  // GLOBAL
        std::string module = take_line();
        std::string name = take_line();
        push(make_global(std::move(module), std::move(name)));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        ValueId name = pop();
        ValueId module = pop();
        if (arena_[name].kind != ValueKind::Str || arena_[module].kind != ValueKind::Str) {
          fail("STACK_GLOBAL needs two strings");
        }
        push(make_global(std::string(arena_[module].text()), std::string(arena_[name].text())));
        break;
      }
      case 'R': {  // REDUCE
        ValueId args = pop();
        ValueId callable = pop();
        push(call(callable, args, false));
        break;
      }
      case 0x81: {  // NEWOBJ
        ValueId args = pop();
        ValueId cls = pop();
        push(call(cls, args, true));
        break;
      }
      case 0x92: {  // NEWOBJ_EX: keyword arguments are dropped from the tree
        pop();
        ValueId args = pop();
        ValueId cls = pop();
        push(call(cls, args, true));
        break;
      }
      case 'i': {  // INST
        std::string module = take_line();
        std::string name = take_line();
        NewValue args;
        args.kind = ValueKind::Tuple;
        args.items = pop_mark();
        ValueId args_id = arena_.add(args);
        push(call(make_global(std::move(module), std::move(name)), args_id, true));
        break;
      }
      case 'o': {  // OBJ
        auto items = pop_mark();
        if (items.empty()) fail("OBJ without a class");
        NewValue args;
        args.kind = ValueKind::Tuple;
        args.items.assign(items.begin() + 1, items.end());
        ValueId args_id = arena_.add(args);
        push(call(items[0], args_id, true));
        break;
      }
      case 'b': {  // BUILD: state is recorded, never applied by calling anything
        ValueId state = pop();
        ValueId target = top();
        arena_.set_state(target, state);  // on an Object; anything else ignores it
        break;
      }
      case 'P': {  // PERSID (text)
        NewValue pid;
        pid.kind = ValueKind::Str;
        pid.text = arena_.keep(take_line());
        ValueId pid_id = arena_.add(pid);
        NewValue v;
        v.kind = ValueKind::PersistentRef;
        v.items = {pid_id};
        push_new(v);
        break;
      }
      case 'Q': {  // BINPERSID
        NewValue v;
        v.kind = ValueKind::PersistentRef;
        v.items = {pop()};
        push_new(v);
        break;
      }
      case 'p': {  // PUT (text)
        std::int64_t idx = 0;
        if (!parse_int64(take_line(), idx) || idx < 0) fail("bad PUT index");
        memo_put(static_cast<std::uint64_t>(idx), top());
        break;
      }
      case 'q':
        memo_put(take_le<std::uint8_t>(), top());
        break;
      case 'r':
        memo_put(take_le<std::uint32_t>(), top());
        break;
      case 0x94:  // MEMOIZE
        memo_put(memo_count_, top());
        break;
      case 'g': {  // GET (text)
        std::int64_t idx = 0;
        if (!parse_int64(take_line(), idx) || idx < 0) fail("bad GET index");
        push(memo_get(static_cast<std::uint64_t>(idx)));
        break;
      }
      case 'h':
        push(memo_get(take_le<std::uint8_t>()));
        break;
      case 'j':
        push(memo_get(take_le<std::uint32_t>()));
        break;
      case 0x98:  // READONLY_BUFFER: no effect on data
        break;
      case 0x82:
      case 0x83:
      case 0x84:
        fail("extension-registry opcodes (EXT1/2/4) are not supported");
      case 0x97:
        fail("out-of-band buffers (NEXT_BUFFER) cannot occur in a file");
      default:
        fail(fmt::format("unknown opcode 0x{:02x}", op));
    }
  }
}

}  // namespace ckptfs
