// One launch syntax for both builds of the kernels:
//   DUALENC_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...)
// is `kernel<<<grid, block, smem_bytes, stream>>>(args...)` under nvcc and a
// launch through the CPU emulator (csrc/emu/emu.h) in the emulated build.
#pragma once

#if defined(DUALENC_EMU)
#define DUALENC_LAUNCH(kernel, grid, block, smem, stream) \
  ::emu::launch(#kernel, kernel, grid, block, smem, stream)
#else
#define DUALENC_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
