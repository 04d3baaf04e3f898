// Where the bytes of a tensor's logical C-order image live inside its storage.
//
// A tensor file holds the tensor's elements in C order even when the pickled tensor is a view
// (storage offset, transposed or stepped strides, stride 0 for expanded dims, overlap). The
// layout maps any byte range of that image to runs of contiguous storage bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace ckptfs {

class TensorLayout {
 public:
  // Validates the view against |storage_nbytes|: returns an error message if the shape
  // overflows or the view reaches outside the storage (a corrupt or hostile file).
  static std::optional<std::string> validate(std::span<const std::int64_t> shape,
                                             std::span<const std::int64_t> stride,
                                             std::int64_t storage_offset, std::uint32_t itemsize,
                                             std::uint64_t storage_nbytes);

  // Precondition: validate() returned no error.
  TensorLayout(std::span<const std::int64_t> shape, std::span<const std::int64_t> stride,
               std::int64_t storage_offset, std::uint32_t itemsize);

  std::uint64_t nbytes() const { return nbytes_; }
  bool contiguous() const { return dims_.empty(); }

  // Calls |run(storage_byte_offset, length)| for consecutive pieces of the image range
  // [offset, offset + length), in order. Precondition: the range lies within nbytes().
  void for_each_run(std::uint64_t offset, std::uint64_t length,
                    const std::function<void(std::uint64_t, std::uint64_t)>& run) const;

 private:
  struct Dim {
    std::uint64_t size;
    std::uint64_t stride_bytes;
  };
  std::uint64_t nbytes_ = 0;
  std::uint64_t base_ = 0;       // storage byte offset of element 0
  std::uint64_t run_bytes_ = 0;  // bytes of the innermost contiguous run
  std::vector<Dim> dims_;        // outer dims (outermost first); empty when fully contiguous
};

}  // namespace ckptfs
