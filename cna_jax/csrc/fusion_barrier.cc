// An opaque identity for XLA:CPU: its output is its input (the same buffer where XLA aliases them, else a
// copy). XLA fuses elementwise producers into the layout changes that feed its dots and cannot see through a
// custom call, so a value passed through this one is computed once, in its own layout, and only then
// transposed (cna_jax/models/llama.py, swiglu's gradient). XLA FFI handler (cna_jax/cpu_kernels.py builds it).
//
//   CnaFusionBarrier: x float32 (any shape) -> x
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error FusionBarrier(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (out->size_bytes() != x.size_bytes()) {
    return ffi::Error::InvalidArgument("fusion_barrier: the output must have the input's size");
  }
  if (out->untyped_data() != x.untyped_data()) {
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnaFusionBarrier, FusionBarrier,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
