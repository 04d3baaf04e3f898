// Error policy of core/: every failure is an exception derived from CkptError.
// FormatError  - the checkpoint's content is malformed, hostile or unsupported.
// IoError      - the bytes could not be read (carries errno).
// fs/ is the only layer that turns these into errno values (see docs/design.md).
#pragma once

#include <stdexcept>
#include <string>
#include <system_error>

namespace ckptfs {

class CkptError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class FormatError : public CkptError {
 public:
  using CkptError::CkptError;
};

class IoError : public CkptError {
 public:
  IoError(const std::string& what, int err) : CkptError(what), errno_(err) {}
  int error_number() const noexcept { return errno_; }

 private:
  int errno_;
};

// The text of an errno value; unlike std::strerror, safe to call from several threads.
inline std::string errno_text(int err) {
  return std::generic_category().message(err);
}

}  // namespace ckptfs
