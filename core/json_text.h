// Small helpers for writing JSON text (no DOM: ckptfs only ever writes JSON).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ckptfs {

// Appends |s| as a JSON string literal. Invalid UTF-8 bytes become U+FFFD; lone surrogates
// (which Python pickles with surrogatepass) are written as \uXXXX escapes.
void append_json_string(std::string& out, std::string_view s);

// Appends a double the way Python's repr reads back (shortest round trip, always with a '.'
// or exponent). NaN and infinities, which JSON lacks, are written as the strings Python's
// float() reads: "nan", "inf", "-inf".
void append_json_number(std::string& out, double v);

void append_json_int_array(std::string& out, std::span<const std::int64_t> v);

}  // namespace ckptfs
