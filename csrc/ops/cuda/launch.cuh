// One launch syntax for both builds of the kernels:
//   DUALENC_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...)
// is `kernel<<<grid, block, smem_bytes, stream>>>(args...)` under nvcc and a
// launch through the CPU emulator (csrc/emu/emu.h) in the emulated build.
//   DUALENC_CHECK_ALIGNED(ptr, bytes)
// states that a vector access of `bytes` bytes at `ptr` follows: nothing under
// nvcc (the GPU itself faults on a misaligned one), a check that raises in the
// emulated build.
#pragma once

#if defined(DUALENC_EMU)
#define DUALENC_LAUNCH(kernel, grid, block, smem, stream) \
  ::emu::launch(#kernel, kernel, grid, block, smem, stream)
#define DUALENC_CHECK_ALIGNED(ptr, bytes) ::emu::check_aligned((ptr), (bytes))
#else
#define DUALENC_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define DUALENC_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif
