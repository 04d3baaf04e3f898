#include "known_objects.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "dtype.h"
#include "json_text.h"

namespace ckptfs {
namespace {

constexpr std::size_t kMaxArrayValues = 100000;

bool is_one_of(std::string_view name, std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (name == n) return true;
  }
  return false;
}

std::optional<std::span<const ValueId>> args_of(const ValueArena& a, const Value& obj) {
  if (obj.args() == kNoValue) return std::nullopt;
  const Value& t = a[obj.args()];
  if (t.kind != ValueKind::Tuple && t.kind != ValueKind::List) return std::nullopt;
  return t.items();
}

// A numpy dtype pickled as REDUCE numpy.dtype('f8', False, True) + BUILD (3, '<', ...).
struct NumpyType {
  char kind = 0;  // b i u f c
  std::size_t size = 0;
  bool big_endian = false;
  std::string descr;  // e.g. "<f8"
};

std::optional<NumpyType> numpy_type(const ValueArena& a, ValueId v) {
  if (v == kNoValue || a[v].kind != ValueKind::Object) return std::nullopt;
  const Value& o = a[v];
  if (!a.is_global(o.cls(), "numpy.dtype")) return std::nullopt;
  const auto args = args_of(a, o);
  if (!args || args->empty() || a[(*args)[0]].kind != ValueKind::Str) return std::nullopt;
  const std::string_view d = a[(*args)[0]].text();
  if (d.size() < 2) return std::nullopt;
  NumpyType t;
  t.kind = d[0];
  std::size_t size = 0;  // as atoi: the leading digits, 0 without any
  std::from_chars(d.data() + 1, d.data() + d.size(), size);
  t.size = size;
  char order = '|';
  if (o.state() != kNoValue && a[o.state()].kind == ValueKind::Tuple &&
      a[o.state()].items().size() > 1 && a[a[o.state()].items()[1]].kind == ValueKind::Str &&
      !a[a[o.state()].items()[1]].text().empty()) {
    order = a[a[o.state()].items()[1]].text()[0];
  }
  t.big_endian = order == '>';
  // The values are decoded to numbers, so report the type as numpy loads it: native order.
  t.descr = std::string(1, t.size > 1 ? '<' : '|');
  t.descr += d;
  bool known = (t.kind == 'b' && t.size == 1) ||
               ((t.kind == 'i' || t.kind == 'u') &&
                (t.size == 1 || t.size == 2 || t.size == 4 || t.size == 8)) ||
               (t.kind == 'f' && (t.size == 2 || t.size == 4 || t.size == 8)) ||
               (t.kind == 'c' && (t.size == 8 || t.size == 16));
  if (!known) return std::nullopt;
  return t;
}

double half_to_double(std::uint16_t h) {
  int exp = (h >> 10) & 0x1F;
  int mant = h & 0x3FF;
  double v = exp == 0    ? std::ldexp(mant, -24)
             : exp == 31 ? (mant ? NAN : INFINITY)
                         : std::ldexp(mant + 1024, exp - 25);
  return (h & 0x8000) ? -v : v;
}

std::uint64_t load_uint(const unsigned char* p, std::size_t n, bool big) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t(p[big ? n - 1 - i : i]) << (8 * i);
  return v;
}

void append_scalar(std::string& out, const NumpyType& t, const unsigned char* p) {
  switch (t.kind) {
    case 'b':
      out += p[0] ? "true" : "false";
      return;
    case 'u':
      out += fmt::format("{}", load_uint(p, t.size, t.big_endian));
      return;
    case 'i': {
      std::uint64_t u = load_uint(p, t.size, t.big_endian);
      if (t.size < 8 && (u >> (8 * t.size - 1)) & 1) u |= ~std::uint64_t{0} << (8 * t.size);
      out += fmt::format("{}", static_cast<std::int64_t>(u));
      return;
    }
    case 'f': {
      std::uint64_t u = load_uint(p, t.size, t.big_endian);
      double d;
      if (t.size == 2) {
        d = half_to_double(static_cast<std::uint16_t>(u));
      } else if (t.size == 4) {
        float f;
        auto u32 = static_cast<std::uint32_t>(u);
        std::memcpy(&f, &u32, 4);
        d = f;
      } else {
        std::memcpy(&d, &u, 8);
      }
      append_json_number(out, d);
      return;
    }
    case 'c': {
      NumpyType half = t;
      half.kind = 'f';
      half.size = t.size / 2;
      out += "{\"real\": ";
      append_scalar(out, half, p);
      out += ", \"imag\": ";
      append_scalar(out, half, p + half.size);
      out += "}";
      return;
    }
  }
}

std::optional<std::string> numpy_scalar(const ValueArena& a, const Value& o) {
  const auto args = args_of(a, o);
  if (!args || args->size() != 2 || a[(*args)[1]].kind != ValueKind::Bytes) return std::nullopt;
  auto t = numpy_type(a, (*args)[0]);
  const std::string_view raw = a[(*args)[1]].text();
  if (!t || raw.size() != t->size) return std::nullopt;
  std::string out;
  append_scalar(out, *t, reinterpret_cast<const unsigned char*>(raw.data()));
  return out;
}

std::optional<std::string> numpy_array(const ValueArena& a, const Value& o) {
  // _reconstruct(ndarray, (0,), b'b') + BUILD (version, shape, dtype, is_fortran, raw bytes)
  if (o.state() == kNoValue || a[o.state()].kind != ValueKind::Tuple ||
      a[o.state()].items().size() != 5)
    return std::nullopt;
  const auto& st = a[o.state()].items();
  auto t = numpy_type(a, st[2]);
  if (!t || a[st[1]].kind != ValueKind::Tuple || a[st[4]].kind != ValueKind::Bytes)
    return std::nullopt;
  std::vector<std::uint64_t> shape;
  std::uint64_t count = 1;
  for (ValueId d : a[st[1]].items()) {
    if (a[d].kind != ValueKind::Int || a[d].integer() < 0) return std::nullopt;
    shape.push_back(static_cast<std::uint64_t>(a[d].integer()));
    if (__builtin_mul_overflow(count, shape.back(), &count)) return std::nullopt;
  }
  const std::string_view raw = a[st[4]].text();
  if (count * t->size != raw.size()) return std::nullopt;
  const bool fortran = a[st[3]].kind == ValueKind::Bool && a[st[3]].boolean;
  std::string out = "{\"__ndarray__\": {\"dtype\": ";
  append_json_string(out, t->descr);
  out += ", \"shape\": [";
  for (std::size_t i = 0; i < shape.size(); ++i)
    out += fmt::format("{}{}", i ? ", " : "", shape[i]);
  out += "]";
  if (count <= kMaxArrayValues) {
    // Nested lists in C order; Fortran-ordered data is indexed column-major.
    std::vector<std::uint64_t> stride(shape.size(), 1);
    for (std::size_t d = 0; d < shape.size(); ++d) {
      std::size_t dim = fortran ? d : shape.size() - 1 - d;
      std::size_t prev = fortran ? d - 1 : dim + 1;
      if (d > 0) stride[dim] = stride[prev] * std::max<std::uint64_t>(shape[prev], 1);
    }
    out += ", \"values\": ";
    std::vector<std::uint64_t> index(shape.size(), 0);
    auto emit = [&](auto&& self, std::size_t dim, std::uint64_t offset) -> void {
      if (dim == shape.size()) {
        append_scalar(out, *t,
                      reinterpret_cast<const unsigned char*>(raw.data()) + offset * t->size);
        return;
      }
      out += "[";
      for (std::uint64_t i = 0; i < shape[dim]; ++i) {
        if (i) out += ", ";
        self(self, dim + 1, offset + i * stride[dim]);
      }
      out += "]";
    };
    emit(emit, 0, 0);
  } else {
    out += fmt::format(", \"nbytes\": {}, \"values\": \"omitted: more than {} elements\"",
                       raw.size(), kMaxArrayValues);
  }
  out += "}}";
  return out;
}

}  // namespace

std::optional<std::string> render_known_object(const ValueArena& a, ValueId v) {
  const Value& val = a[v];
  if (val.kind == ValueKind::Global) {
    // torch.float32, torch.qint8, ...: a dtype reads as its name.
    if (val.text().starts_with("torch.") && val.text().find('.', 6) == std::string::npos &&
        dtype_by_name(val.text())) {
      std::string out;
      append_json_string(out, val.text());
      return out;
    }
    return std::nullopt;
  }
  if (val.kind != ValueKind::Object || val.cls() == kNoValue ||
      a[val.cls()].kind != ValueKind::Global)
    return std::nullopt;
  const std::string_view cls = a[val.cls()].text();
  const auto args = args_of(a, val);
  if (cls == "torch.Size" && args && args->size() == 1 && a[(*args)[0]].kind == ValueKind::Tuple) {
    std::string out = "[";
    for (std::size_t i = 0; i < a[(*args)[0]].items().size(); ++i) {
      const Value& d = a[a[(*args)[0]].items()[i]];
      if (d.kind != ValueKind::Int) return std::nullopt;
      out += fmt::format("{}{}", i ? ", " : "", d.integer());
    }
    return out + "]";
  }
  if (cls == "torch.device" && args && !args->empty() && a[(*args)[0]].kind == ValueKind::Str) {
    std::string dev(a[(*args)[0]].text());
    if (args->size() > 1 && a[(*args)[1]].kind == ValueKind::Int)
      dev += fmt::format(":{}", a[(*args)[1]].integer());
    std::string out;
    append_json_string(out, dev);
    return out;
  }
  if (cls == "torch.serialization._get_layout" && args && args->size() == 1 &&
      a[(*args)[0]].kind == ValueKind::Str) {
    std::string out;
    append_json_string(out, a[(*args)[0]].text());
    return out;
  }
  if (is_one_of(cls, {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}))
    return numpy_scalar(a, val);
  if (is_one_of(cls,
                {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})) {
    return numpy_array(a, val);
  }
  if (cls == "numpy.dtype") {
    if (auto t = numpy_type(a, v)) {
      std::string out;
      append_json_string(out, t->descr);
      return out;
    }
  }
  return std::nullopt;
}

}  // namespace ckptfs
