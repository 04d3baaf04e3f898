// Pickle reader tests. The inputs were produced by CPython 3.11's pickle.dumps (the expression
// is above each one); the expectations follow from Python's semantics, not from this reader.
#include "pickle_reader.h"

#include <fmt/format.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>

#include "errors.h"

using namespace ckptfs;

namespace {

std::string unhex(std::string_view hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
  return out;
}

// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=0)
const std::string kBasicP0 = unhex(
    "286470300a56610a70310a286c70320a49310a6146322e350a6156780a70330a614e614930310a617356620a70340a"
    "2849310a49320a49330a7470350a732e");
// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=1)
const std::string kBasicP1 = unhex(
    "7d71002858010000006171015d7102284b0147400400000000000058010000007871034e4930310a65580100000062"
    "7104284b014b024b03747105752e");
// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=2)
const std::string kBasicP2 = unhex(
    "80027d71002858010000006171015d7102284b0147400400000000000058010000007871034e886558010000006271"
    "044b014b024b03877105752e");
// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=3)
const std::string kBasicP3 = unhex(
    "80037d71002858010000006171015d7102284b0147400400000000000058010000007871034e886558010000006271"
    "044b014b024b03877105752e");
// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=4)
const std::string kBasicP4 = unhex(
    "8004952a000000000000007d94288c0161945d94284b014740040000000000008c0178944e88658c0162944b014b02"
    "4b038794752e");
// pickle.dumps({'a': [1, 2.5, 'x', None, True], 'b': (1, 2, 3)}, protocol=5)
const std::string kBasicP5 = unhex(
    "8005952a000000000000007d94288c0161945d94284b014740040000000000008c0178944e88658c0162944b014b02"
    "4b038794752e");
// x = [1]; pickle.dumps([x, x], protocol=2)
const std::string kMemoShared = unhex("80025d7100285d71014b01616801652e");
// pickle.dumps([0, 255, 256, 65535, 65536, -1, 2147483648, 9223372036854775807,
// -9223372036854775808, 1180591620717411303424, -1180591620717411303424], protocol=0)
const std::string kIntsP0 = unhex(
    "286c70300a49300a61493235350a61493235360a614936353533350a614936353533360a61492d310a614c32313437"
    "3438333634384c0a614c393232333337323033363835343737353830374c0a614c2d39323233333732303336383534"
    "3737353830384c0a614c313138303539313632303731373431313330333432344c0a614c2d31313830353931363230"
    "3731373431313330333432344c0a612e");
// pickle.dumps([0, 255, 256, 65535, 65536, -1, 2147483648, 9223372036854775807,
// -9223372036854775808, 1180591620717411303424, -1180591620717411303424], protocol=2)
const std::string kIntsP2 = unhex(
    "80025d7100284b004bff4d00014dffff4a000001004affffffff8a0500000080008a08ffffffffffffff7f8a080000"
    "0000000000808a090000000000000000408a090000000000000000c0652e");
// pickle.dumps(b'\x00\x80\xff', protocol=2)
const std::string kBytesP2 = unhex(
    "8002635f636f646563730a656e636f64650a7100580500000000c280c3bf710158060000006c6174696e3171028671"
    "035271042e");
// pickle.dumps(b'\x00\x80\xff', protocol=3)
const std::string kBytesP3 = unhex("800343030080ff71002e");
// pickle.dumps(collections.OrderedDict([('k', 1), ('j', 2)]), protocol=2)
const std::string kOrderedDictP2 = unhex(
    "800263636f6c6c656374696f6e730a4f726465726564446963740a7100295271012858010000006b71024b01580100"
    "00006a71034b02752e");
// pickle.dumps(Evil(), protocol=2)  # __reduce__ -> (os.system, ('echo pwned',))
const std::string kEvilP2 =
    unhex("800263706f7369780a73797374656d0a7100580a0000006563686f2070776e656471018571025271032e");
// pickle.dumps(Evil(), protocol=4)
const std::string kEvilP4 = unhex(
    "80049525000000000000008c05706f736978948c0673797374656d9493948c0a6563686f2070776e65649485945294"
    "2e");
// pickle.dumps([{1, 2}, frozenset([3])], protocol=4)
const std::string kSetsP4 = unhex("80049512000000000000005d94288f94284b014b0290284b039194652e");
// pickle.dumps({7}, protocol=2)
const std::string kSetP2 =
    unhex("8002635f5f6275696c74696e5f5f0a7365740a71005d71014b07618571025271032e");
// pickle.dumps('h\u00e9llo \u2603 \U0001F600', protocol=0)
const std::string kUnicodeP0 = unhex("5668e96c6c6f205c7532363033205c5530303031663630300a70300a2e");
// l = []; l.append(l); pickle.dumps(l, protocol=2)
const std::string kRecursiveList = unhex("80025d71006800612e");
// pickle.dumps([0.1, -1e300, float('inf')], protocol=0)
// a = tuple([1024]); b = tuple([1024])  (two objects)
// pickle.dumps([a, b, (), (1, 2), (1, 'x'), (1, 2, 3, 4, 5), [1], [1], (None, True)], protocol=2)
const std::string kTuplesP2 = unhex(
    "80025d7100284d00048571014d0004857102294b014b028671034b015801000000787104867105284b014b024b034b"
    "044b057471065d71074b01615d71084b01614e88867109652e");
// The same with protocol=0 (MARK ... TUPLE only).
const std::string kTuplesP0 = unhex(
    "286c70300a2849313032340a7470310a612849313032340a7470320a612874612849310a49320a7470330a61284931"
    "0a56780a70340a7470350a612849310a49320a49330a49340a49350a7470360a61286c70370a49310a6161286c7038"
    "0a49310a6161284e4930310a7470390a612e");
const std::string kFloatsP0 = unhex("286c70300a46302e310a61462d31652b3330300a6146696e660a612e");

struct Parsed {
  ValueArena arena;
  ValueId root = kNoValue;
  const Value& operator[](ValueId id) const { return arena[id]; }
  const Value& root_value() const { return arena[root]; }
};

Parsed parse(const std::string& bytes) {
  Parsed p;
  PickleReader r(std::as_bytes(std::span(bytes)), p.arena);
  p.root = r.read();
  return p;
}

// Finds the value of string key |k| in a Dict.
ValueId dict_get(const Parsed& p, ValueId dict, std::string_view k) {
  const auto& items = p[dict].items();
  for (std::size_t i = 0; i + 1 < items.size(); i += 2) {
    if (p[items[i]].kind == ValueKind::Str && p[items[i]].text() == k) return items[i + 1];
  }
  return kNoValue;
}

}  // namespace

TEST_CASE("every protocol decodes the same nested containers") {
  for (const std::string* bytes :
       {&kBasicP0, &kBasicP1, &kBasicP2, &kBasicP3, &kBasicP4, &kBasicP5}) {
    Parsed p = parse(*bytes);
    REQUIRE(p.root_value().kind == ValueKind::Dict);
    ValueId a = dict_get(p, p.root, "a");
    REQUIRE(a != kNoValue);
    REQUIRE(p[a].kind == ValueKind::List);
    REQUIRE(p[a].items().size() == 5);
    CHECK(p[p[a].items()[0]].kind == ValueKind::Int);
    CHECK(p[p[a].items()[0]].integer() == 1);
    CHECK(p[p[a].items()[1]].kind == ValueKind::Float);
    CHECK(p[p[a].items()[1]].real() == 2.5);
    CHECK(p[p[a].items()[2]].text() == "x");
    CHECK(p[p[a].items()[3]].kind == ValueKind::None);
    CHECK(p[p[a].items()[4]].kind == ValueKind::Bool);
    CHECK(p[p[a].items()[4]].boolean);
    ValueId b = dict_get(p, p.root, "b");
    REQUIRE(p[b].kind == ValueKind::Tuple);
    REQUIRE(p[b].items().size() == 3);
    CHECK(p[p[b].items()[2]].integer() == 3);
  }
}

TEST_CASE("the memo shares one object between references") {
  Parsed p = parse(kMemoShared);
  REQUIRE(p.root_value().items().size() == 2);
  CHECK(p.root_value().items()[0] == p.root_value().items()[1]);
}

TEST_CASE("tuples decode by content; equal short tuples of small scalars are one value") {
  for (const std::string* bytes : {&kTuplesP2, &kTuplesP0}) {
    Parsed p = parse(*bytes);
    const auto& top = p.root_value().items();
    REQUIRE(top.size() == 9);
    auto ints = [&](ValueId t) {
      std::vector<std::int64_t> out;
      for (ValueId i : p[t].items()) out.push_back(p[i].integer());
      return out;
    };
    for (std::size_t i : {0, 1, 2, 3, 4, 5, 8}) CHECK(p[top[i]].kind == ValueKind::Tuple);
    CHECK(ints(top[0]) == std::vector<std::int64_t>{1024});
    CHECK(ints(top[1]) == std::vector<std::int64_t>{1024});
    CHECK(p[top[2]].items().empty());
    CHECK(ints(top[3]) == std::vector<std::int64_t>{1, 2});
    REQUIRE(p[top[4]].items().size() == 2);
    CHECK(p[p[top[4]].items()[1]].text() == "x");
    CHECK(ints(top[5]) == std::vector<std::int64_t>{1, 2, 3, 4, 5});
    REQUIRE(p[top[8]].items().size() == 2);
    CHECK(p[p[top[8]].items()[0]].kind == ValueKind::None);
    CHECK(p[p[top[8]].items()[1]].boolean);
    // Two distinct but equal tuples of small ints share a value (tuples are immutable)...
    CHECK(top[0] == top[1]);
    // ... unlike lists, which APPEND may change, and tuples holding anything else.
    CHECK(p[top[6]].kind == ValueKind::List);
    CHECK(top[6] != top[7]);
    CHECK(top[4] != top[3]);
  }
}

TEST_CASE("70,000 equal tuples: one value, memoized 70,000 times") {
  // Byte for byte what CPython 3.11 writes for
  // pickle.dumps([tuple([1]) for _ in range(70000)], protocol=2) (checked against it): the
  // memo numbers each tuple although the reader keeps one, so the memo outgrows the values.
  std::string bytes = unhex("80025d7100");
  std::uint32_t memo = 1;
  for (int start = 0; start < 70000; start += 1000) {
    bytes += '(';
    for (int i = start; i < std::min(start + 1000, 70000); ++i, ++memo) {
      bytes += unhex("4b0185");  // BININT1 1, TUPLE1
      if (memo < 256) {
        bytes += 'q';
        bytes += static_cast<char>(memo);
      } else {
        bytes += 'r';
        for (int b = 0; b < 4; ++b) bytes += static_cast<char>((memo >> (8 * b)) & 0xFF);
      }
    }
    bytes += 'e';  // APPENDS
  }
  bytes += '.';
  REQUIRE(bytes.size() == 559381);
  Parsed p = parse(bytes);
  const auto& items = p.root_value().items();
  REQUIRE(items.size() == 70000);
  CHECK(p[items.front()].items().size() == 1);
  CHECK(p[p[items.front()].items()[0]].integer() == 1);
  CHECK(std::all_of(items.begin(), items.end(), [&](ValueId v) { return v == items.front(); }));
  CHECK(p.arena.size() < 10);
}

TEST_CASE("lists grown one APPEND at a time, between other lists, keep every item") {
  // Byte for byte what CPython 3.11 writes for
  // pickle.dumps([[i, i + 1] for i in range(2000)], protocol=0) (checked against it): each
  // inner list is built between two APPENDs to the outer one, so the outer list's items move
  // to larger room again and again while other lists take the room after them.
  std::string bytes = "(lp0\n";
  for (int i = 0; i < 2000; ++i) bytes += fmt::format("(lp{}\nI{}\naI{}\naa", i + 1, i, i + 1);
  bytes += '.';
  REQUIRE(bytes.size() == 42682);
  Parsed p = parse(bytes);
  REQUIRE(p.root_value().kind == ValueKind::List);
  const auto outer = p.root_value().items();
  REQUIRE(outer.size() == 2000);
  for (std::size_t i = 0; i < outer.size(); ++i) {
    const auto inner = p[outer[i]].items();
    REQUIRE(inner.size() == 2);
    CHECK(p[inner[0]].integer() == static_cast<std::int64_t>(i));
    CHECK(p[inner[1]].integer() == static_cast<std::int64_t>(i + 1));
  }
}

TEST_CASE("an opaque object keeps its class, arguments, state, and appended items") {
  // class C:
  //   def __reduce__(self):
  //     return (argparse.Namespace, (), {'s': 2}, iter([3, 4]), iter([('k', 5)]))
  // pickle.dumps(C(), protocol=2)
  Parsed p = parse(unhex(
      "80026361726770617273650a4e616d6573706163650a710029527101284b034b046558010000006b71024b0573"
      "7d710358010000007371044b0273622e"));
  const Value& o = p.root_value();
  REQUIRE(o.kind == ValueKind::Object);
  CHECK(p[o.cls()].kind == ValueKind::Global);
  CHECK(p[o.cls()].text() == "argparse.Namespace");
  REQUIRE(o.args() != kNoValue);
  CHECK(p[o.args()].kind == ValueKind::Tuple);
  CHECK(p[o.args()].items().empty());
  REQUIRE(o.state() != kNoValue);
  CHECK(p[dict_get(p, o.state(), "s")].integer() == 2);
  REQUIRE(o.list_items() != kNoValue);
  const auto listed = p[o.list_items()].items();
  REQUIRE(listed.size() == 2);
  CHECK(p[listed[0]].integer() == 3);
  CHECK(p[listed[1]].integer() == 4);
  REQUIRE(o.dict_items() != kNoValue);
  CHECK(p[dict_get(p, o.dict_items(), "k")].integer() == 5);
  // What a kind does not have reads as empty, never as another kind's bytes.
  CHECK(o.text().empty());
  CHECK(o.items().empty());
  CHECK(o.integer() == 0);
  const Value& name = p[o.cls()];
  CHECK(name.items().empty());
  CHECK(name.integer() == 0);
  CHECK(name.cls() == kNoValue);
  CHECK(name.state() == kNoValue);
  const Value& three = p[listed[0]];
  CHECK(three.text().empty());
  CHECK(three.items().empty());
  CHECK(three.real() == 0.0);
  CHECK(three.args() == kNoValue);
}

TEST_CASE("a shared tuple stays a tuple: appending to one is refused") {
  // (1,) then APPEND 2 to it: Python raises (a tuple has no append); so must the reader, or
  // every other (1,) would change.
  const std::string bytes = unhex("80024b01854b02612e");
  CHECK_THROWS_AS(parse(bytes), FormatError);
}

TEST_CASE("integers of every width, including beyond int64") {
  for (const std::string* bytes : {&kIntsP0, &kIntsP2}) {
    Parsed p = parse(*bytes);
    const auto& v = p.root_value().items();
    REQUIRE(v.size() == 11);
    const std::int64_t small[] = {0,  255,          256,       65535,    65536,
                                  -1, 2147483648LL, INT64_MAX, INT64_MIN};
    for (std::size_t i = 0; i < 9; ++i) {
      REQUIRE(p[v[i]].kind == ValueKind::Int);
      CHECK(p[v[i]].integer() == small[i]);
    }
    REQUIRE(p[v[9]].kind == ValueKind::BigInt);
    CHECK(p[v[9]].text() == "1180591620717411303424");
    CHECK(p[v[10]].text() == "-1180591620717411303424");
  }
}

TEST_CASE("bytes: protocol 2 (_codecs.encode latin1) and protocol 3 (BINBYTES)") {
  for (const std::string* bytes : {&kBytesP2, &kBytesP3}) {
    Parsed p = parse(*bytes);
    REQUIRE(p.root_value().kind == ValueKind::Bytes);
    CHECK(p.root_value().text() == std::string("\x00\x80\xff", 3));
  }
}

TEST_CASE("OrderedDict becomes an ordered dict") {
  Parsed p = parse(kOrderedDictP2);
  REQUIRE(p.root_value().kind == ValueKind::Dict);
  REQUIRE(p.root_value().items().size() == 4);
  CHECK(p[p.root_value().items()[0]].text() == "k");
  CHECK(p[p.root_value().items()[2]].text() == "j");
}

TEST_CASE("a call of os.system is recorded, never executed") {
  for (const std::string* bytes : {&kEvilP2, &kEvilP4}) {
    Parsed p = parse(*bytes);
    REQUIRE(p.root_value().kind == ValueKind::Object);
    CHECK(p[p.root_value().cls()].kind == ValueKind::Global);
    CHECK(p[p.root_value().cls()].text() == "posix.system");
    CHECK(p[p[p.root_value().args()].items()[0]].text() == "echo pwned");
  }
}

TEST_CASE("sets and frozensets") {
  Parsed p4 = parse(kSetsP4);
  REQUIRE(p4.root_value().items().size() == 2);
  CHECK(p4[p4.root_value().items()[0]].kind == ValueKind::Set);
  CHECK(p4[p4.root_value().items()[0]].items().size() == 2);
  CHECK(p4[p4.root_value().items()[1]].kind == ValueKind::Set);
  Parsed p2 = parse(kSetP2);
  REQUIRE(p2.root_value().kind == ValueKind::Set);
  CHECK(p2[p2.root_value().items()[0]].integer() == 7);
}

TEST_CASE("protocol 0 unicode and floats") {
  Parsed u = parse(kUnicodeP0);
  CHECK(u.root_value().text() == "h\xc3\xa9llo \xe2\x98\x83 \xf0\x9f\x98\x80");
  Parsed f = parse(kFloatsP0);
  REQUIRE(f.root_value().items().size() == 3);
  CHECK(f[f.root_value().items()[0]].real() == 0.1);
  CHECK(f[f.root_value().items()[1]].real() == -1e300);
  CHECK(std::isinf(f[f.root_value().items()[2]].real()));
}

TEST_CASE("a list that contains itself") {
  Parsed p = parse(kRecursiveList);
  REQUIRE(p.root_value().kind == ValueKind::List);
  REQUIRE(p.root_value().items().size() == 1);
  CHECK(p.root_value().items()[0] == p.root);
}

TEST_CASE("every truncation of a valid pickle is a FormatError") {
  for (const std::string* bytes :
       {&kBasicP0, &kBasicP2, &kBasicP4, &kIntsP2, &kEvilP4, &kUnicodeP0}) {
    for (std::size_t n = 0; n < bytes->size(); ++n) {
      std::string cut = bytes->substr(0, n);
      CHECK_THROWS_AS(parse(cut), FormatError);
    }
  }
}

TEST_CASE("hostile and malformed opcodes are refused") {
  CHECK_THROWS_AS(parse(std::string("\x80\x06N.", 4)), FormatError);  // protocol 6
  CHECK_THROWS_AS(parse(std::string("\x82\x01.", 3)), FormatError);   // EXT1
  CHECK_THROWS_AS(parse(std::string("\x97.", 2)), FormatError);       // NEXT_BUFFER
  CHECK_THROWS_AS(parse(std::string("h\x05.", 3)), FormatError);      // GET of nothing
  CHECK_THROWS_AS(parse(std::string("X\xff\xff\xff\x7f"
                                    "abc.",
                                    9)),
                  FormatError);  // 2 GiB string
  CHECK_THROWS_AS(parse(std::string("\x8d\xff\xff\xff\xff\xff\xff\xff\xff.", 10)), FormatError);
  CHECK_THROWS_AS(parse(std::string("0.", 2)), FormatError);  // POP of empty
  CHECK_THROWS_AS(parse(std::string("e.", 2)), FormatError);  // APPENDS no mark
  CHECK_THROWS_AS(parse(std::string("(K\x01"
                                    "d.",
                                    5)),
                  FormatError);                                         // DICT with odd items
  CHECK_THROWS_AS(parse(std::string(200000, '(') + "."), FormatError);  // mark bomb
  CHECK_THROWS_AS(parse(std::string("\xfe.", 2)), FormatError);         // unknown opcode
}

TEST_CASE("the arena limit stops object bombs") {
  std::string bomb;
  for (int i = 0; i < 1000; ++i) bomb += "]";  // 1000 empty lists
  bomb += ".";
  ValueArena arena(100);
  PickleReader r(std::as_bytes(std::span(bomb)), arena);
  CHECK_THROWS_AS(r.read(), FormatError);
}

TEST_CASE("random mutations never crash: they parse or raise FormatError") {
  std::mt19937 rng(42);
  const std::string* seeds[] = {&kBasicP2, &kBasicP4, &kIntsP0,  &kOrderedDictP2,
                                &kSetsP4,  &kEvilP2,  &kFloatsP0};
  int parsed = 0;
  int refused = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::string s = *seeds[iter % 7];
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) s[rng() % s.size()] = static_cast<char>(rng() & 0xFF);
    try {
      parse(s);
      ++parsed;
    } catch (const FormatError&) {
      ++refused;
    }
  }
  CHECK(parsed + refused == 20000);
  CHECK(refused > 0);
}

TEST_CASE("little-endian two's complement to decimal") {
  auto dec = [](std::initializer_list<unsigned> b) {
    std::vector<std::byte> v;
    for (unsigned x : b) v.push_back(static_cast<std::byte>(x));
    return le_twos_complement_to_decimal(v);
  };
  CHECK(dec({}) == "0");
  CHECK(dec({0xff}) == "-1");
  CHECK(dec({0x00, 0x01}) == "256");
  CHECK(dec({0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40}) == "1180591620717411303424");
  CHECK(dec({0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0}) == "-1180591620717411303424");
}
