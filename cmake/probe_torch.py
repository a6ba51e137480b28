"""Describe the installed torch (and the CUDA pieces its pip wheels ship) to CMake.

Run by CMakeLists.txt at configure time with the build's Python; prints CMake
``set()`` commands. Nothing here is hard-coded to one machine: every path is
asked of the installed packages.
"""
import importlib.util
import os
import sys


def cmake_str(value):
    return '"' + str(value).replace("\\", "/").replace('"', '\\"') + '"'


def emit(name, value):
    print(f"set({name} {cmake_str(value)})")


def nvidia_wheel_dirs():
    """include/ and lib/ folders of the nvidia-* CUDA wheels torch depends on."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return [], []
    includes, libs = [], []
    for root in spec.submodule_search_locations:
        for sub in sorted(os.listdir(root)):
            base = os.path.join(root, sub)
            # CUDA 13 wheels: nvidia/cu13/{include,lib}; CUDA 12: nvidia/<lib>/{include,lib}
            inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
            if os.path.isdir(inc):
                includes.append(inc)
            if os.path.isdir(lib):
                libs.append(lib)
    return includes, libs


def find_file(dirs, prefix):
    for d in dirs:
        for name in sorted(os.listdir(d)):
            if name.startswith(prefix) and ".so" in name and "builtins" not in name and ".alt." not in name:
                return os.path.join(d, name)
    return ""


def main():
    import torch
    import torch.utils

    emit("DUALENC_TORCH_VERSION", torch.__version__)
    emit("DUALENC_TORCH_PREFIX_PATH", torch.utils.cmake_prefix_path)
    emit("DUALENC_TORCH_LIB_DIR", os.path.join(os.path.dirname(torch.__file__), "lib"))
    emit("DUALENC_TORCH_CUDA_VERSION", torch.version.cuda or "")
    from torch.utils.cpp_extension import include_paths

    emit("DUALENC_TORCH_INCLUDE_DIRS", ";".join(include_paths()))
    emit("DUALENC_TORCH_CXX11_ABI", int(bool(torch._C._GLIBCXX_USE_CXX11_ABI)))
    includes, libs = nvidia_wheel_dirs()
    emit("DUALENC_NVIDIA_INCLUDE_DIRS", ";".join(includes))
    emit("DUALENC_NVIDIA_LIB_DIRS", ";".join(libs))
    emit("DUALENC_NVRTC_LIBRARY", find_file(libs, "libnvrtc"))
    cublas_header = ""
    for inc in includes:
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            cublas_header = inc
            break
    emit("DUALENC_CUBLAS_INCLUDE_DIR", cublas_header)
    try:
        import pybind11

        emit("DUALENC_PYBIND11_CMAKE_DIR", pybind11.get_cmake_dir())
    except ImportError:
        emit("DUALENC_PYBIND11_CMAKE_DIR", "")


if __name__ == "__main__":
    sys.exit(main())
