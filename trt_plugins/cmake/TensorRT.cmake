# Finds the TensorRT headers (required) and libnvinfer (optional) for the plugin library.
#
# Inputs: TENSORRT_ROOT (cache or environment: the extracted tar folder, or /usr for the deb
# packages), or TENSORRT_INCLUDE_DIR / TENSORRT_LIB_DIR directly.
# Outputs: TENSORRT_INCLUDE_DIR, TENSORRT_VERSION, TENSORRT_LIBRARY (may be NOTFOUND).
#
# No TensorRT wheel ships the C++ headers: they come from the tar or deb packages.

set(TENSORRT_ROOT "$ENV{TENSORRT_ROOT}" CACHE PATH "TensorRT installation (tar folder, or /usr for the deb packages)")
set(TENSORRT_LIB_DIR "" CACHE PATH "Folder with libnvinfer.so (default: under TENSORRT_ROOT)")

find_path(TENSORRT_INCLUDE_DIR NvInfer.h
    HINTS "${TENSORRT_ROOT}/include" "${TENSORRT_ROOT}"
    PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/local/TensorRT/include
    DOC "Folder with NvInfer.h")
if(NOT TENSORRT_INCLUDE_DIR OR NOT EXISTS "${TENSORRT_INCLUDE_DIR}/NvInferVersion.h")
    message(FATAL_ERROR
        "TensorRT headers (NvInfer.h, NvInferVersion.h) not found. No TensorRT wheel ships them: install the "
        "TensorRT tar or deb package (deb: libnvinfer-dev, or libnvinfer-headers-dev for the headers alone; "
        "TensorRT 8.6 for Pascal GPUs, 10.x/11.x for SM 7.5 and newer), then pass -DTENSORRT_ROOT=/path/to/TensorRT "
        "(or -DTENSORRT_INCLUDE_DIR=... and -DTENSORRT_LIB_DIR=...). To build the CUDA kernels alone, without "
        "TensorRT: -DQWEN3VL_KERNELS_ONLY=ON (make kernels).")
endif()

# NvInferVersion.h: numbers in NV_TENSORRT_* (8.x) or in TRT_*_ENTERPRISE (10.x and later).
file(STRINGS "${TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _qwen3vl_trt_defines REGEX "^#define (NV_TENSORRT|TRT)_")
foreach(part MAJOR MINOR PATCH)
    set(TENSORRT_VERSION_${part} "")
    foreach(pattern "NV_TENSORRT_${part}" "TRT_${part}_ENTERPRISE")
        if(TENSORRT_VERSION_${part} STREQUAL "" AND _qwen3vl_trt_defines MATCHES "#define ${pattern} +([0-9]+)")
            set(TENSORRT_VERSION_${part} ${CMAKE_MATCH_1})
        endif()
    endforeach()
endforeach()
set(TENSORRT_VERSION "${TENSORRT_VERSION_MAJOR}.${TENSORRT_VERSION_MINOR}.${TENSORRT_VERSION_PATCH}")
if(TENSORRT_VERSION_MAJOR STREQUAL "")
    message(FATAL_ERROR "Could not read the TensorRT version from ${TENSORRT_INCLUDE_DIR}/NvInferVersion.h.")
endif()
if(TENSORRT_VERSION VERSION_LESS 8.6)
    message(FATAL_ERROR "TensorRT ${TENSORRT_VERSION} at ${TENSORRT_INCLUDE_DIR}: the plugins need 8.6 or newer.")
endif()

# The wheels' lib folders (tensorrt_libs) hold only versioned names such as libnvinfer.so.10.
find_library(TENSORRT_LIBRARY
    NAMES nvinfer "libnvinfer.so.${TENSORRT_VERSION_MAJOR}" "nvinfer_${TENSORRT_VERSION_MAJOR}"
    HINTS "${TENSORRT_LIB_DIR}" "${TENSORRT_ROOT}/lib" "${TENSORRT_ROOT}/lib64" "${TENSORRT_ROOT}/targets/x86_64-linux-gnu/lib"
    PATHS /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/local/TensorRT/lib
    DOC "libnvinfer")
if(TENSORRT_LIBRARY)
    message(STATUS "TensorRT ${TENSORRT_VERSION}: ${TENSORRT_INCLUDE_DIR}, ${TENSORRT_LIBRARY}")
else()
    message(WARNING
        "TensorRT ${TENSORRT_VERSION} headers found at ${TENSORRT_INCLUDE_DIR}, but no libnvinfer: the plugin library "
        "is linked without it, its TensorRT symbols resolved when it is loaded into a process that already has "
        "libnvinfer loaded globally (trtexec; in Python load libnvinfer with ctypes.CDLL(path, "
        "mode=ctypes.RTLD_GLOBAL) first). Pass -DTENSORRT_LIB_DIR=... to link it.")
endif()
