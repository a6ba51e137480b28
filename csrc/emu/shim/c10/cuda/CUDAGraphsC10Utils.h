// Emulated build only (csrc/emu): no CUDA graphs, so no stream is ever being
// captured.
#pragma once

namespace c10::cuda {

enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };

inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }

}  // namespace c10::cuda
