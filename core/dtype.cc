#include "dtype.h"

#include <array>

namespace ckptfs {
namespace {

struct Entry {
  DType dtype;
  std::string_view storage_class;  // "<Name>Storage" without the module
};

// bfloat16 has no numpy dtype: its files are offered to numpy as raw 16-bit words ("<u2"),
// which widen to float32 by a 16-bit left shift (docs/layout.md). The float8 family likewise
// as "|u1".
constexpr std::array kTable = {
    Entry{{"uint8", 1, "|u1"}, "ByteStorage"},
    Entry{{"int8", 1, "|i1"}, "CharStorage"},
    Entry{{"int16", 2, "<i2"}, "ShortStorage"},
    Entry{{"int32", 4, "<i4"}, "IntStorage"},
    Entry{{"int64", 8, "<i8"}, "LongStorage"},
    Entry{{"float16", 2, "<f2"}, "HalfStorage"},
    Entry{{"float32", 4, "<f4"}, "FloatStorage"},
    Entry{{"float64", 8, "<f8"}, "DoubleStorage"},
    Entry{{"complex32", 4, "<u4", true}, "ComplexHalfStorage"},
    Entry{{"complex64", 8, "<c8", true}, "ComplexFloatStorage"},
    Entry{{"complex128", 16, "<c16", true}, "ComplexDoubleStorage"},
    Entry{{"bool", 1, "|b1"}, "BoolStorage"},
    Entry{{"qint8", 1, "|i1", false, true}, "QInt8Storage"},
    Entry{{"quint8", 1, "|u1", false, true}, "QUInt8Storage"},
    Entry{{"qint32", 4, "<i4", false, true}, "QInt32Storage"},
    Entry{{"bfloat16", 2, "<u2"}, "BFloat16Storage"},
    Entry{{"quint4x2", 1, "|u1", false, true}, "QUInt4x2Storage"},
    Entry{{"quint2x4", 1, "|u1", false, true}, "QUInt2x4Storage"},
    Entry{{"float8_e5m2", 1, "|u1"}, "Float8_e5m2Storage"},
    Entry{{"float8_e4m3fn", 1, "|u1"}, "Float8_e4m3fnStorage"},
    Entry{{"float8_e5m2fnuz", 1, "|u1"}, "Float8_e5m2fnuzStorage"},
    Entry{{"float8_e4m3fnuz", 1, "|u1"}, "Float8_e4m3fnuzStorage"},
    Entry{{"uint16", 2, "<u2"}, "UInt16Storage"},
    Entry{{"uint32", 4, "<u4"}, "UInt32Storage"},
    Entry{{"uint64", 8, "<u8"}, "UInt64Storage"},
};

}  // namespace

const DType kNoDType{"", 0, ""};

std::uint8_t dtype_id(const DType& d) {
  for (std::size_t i = 0; i < kTable.size(); ++i) {
    if (&kTable[i].dtype == &d) return static_cast<std::uint8_t>(i + 1);
  }
  return 0;
}

const DType& dtype_from_id(std::uint8_t id) {
  return id == 0 || id > kTable.size() ? kNoDType : kTable[id - 1].dtype;
}

const DType* dtype_by_name(std::string_view name) {
  if (name.starts_with("torch.")) name.remove_prefix(6);
  for (const auto& e : kTable) {
    if (e.dtype.name == name) return &e.dtype;
  }
  return nullptr;
}

const DType* dtype_of_storage_class(std::string_view global_name) {
  auto dot = global_name.rfind('.');
  std::string_view cls = dot == std::string_view::npos ? global_name : global_name.substr(dot + 1);
  if (cls == "UntypedStorage" || cls == "TypedStorage") {
    return dtype_by_name("uint8");  // bytes; a v3 rebuild names the real dtype
  }
  for (const auto& e : kTable) {
    if (e.storage_class == cls) return &e.dtype;
  }
  return nullptr;
}

}  // namespace ckptfs
