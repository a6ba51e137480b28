// Emulated build only (csrc/emu): one stand-in stream; emulated launches run
// to completion before they return.
#pragma once

#include <c10/core/Device.h>

typedef struct CUstream_st* cudaStream_t;

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  c10::DeviceIndex device_index() const { return 0; }
  void synchronize() const {}
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }

}  // namespace c10::cuda
