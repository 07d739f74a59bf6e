# Finds nvcc and chooses CMAKE_CUDA_ARCHITECTURES before the CUDA language is enabled, because
# enable_language(CUDA) already compiles a test program for them.
#
# Default: the GPUs of this machine (nvidia-smi), else 61;75;86;89 (MX250/GTX 10x0, Turing,
# Ampere, Ada) plus PTX of 89 for newer GPUs. CUDA 13 cannot compile for SM 6.x: a Pascal target
# needs a CUDA 12.x toolkit.

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR
        "No CUDA compiler (nvcc) found. Install the CUDA toolkit -- 12.x for Pascal GPUs (SM 6.1: "
        "MX250/MX350/GTX 10x0), 12.x or 13.x for SM 7.5 and newer -- and put its bin/ on PATH, or pass "
        "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-12.8/bin/nvcc.")
endif()

execute_process(
    COMMAND "${CMAKE_CUDA_COMPILER}" --version
    OUTPUT_VARIABLE _qwen3vl_nvcc_version
    ERROR_QUIET)
if(NOT _qwen3vl_nvcc_version MATCHES "release ([0-9]+)\\.([0-9]+)")
    message(FATAL_ERROR "Could not read the CUDA version from '${CMAKE_CUDA_COMPILER} --version'.")
endif()
set(QWEN3VL_CUDA_VERSION_MAJOR ${CMAKE_MATCH_1})
set(QWEN3VL_CUDA_VERSION "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")

# The oldest SM the toolkit still compiles for.
if(QWEN3VL_CUDA_VERSION_MAJOR GREATER_EQUAL 13)
    set(_qwen3vl_min_sm 75)
else()
    set(_qwen3vl_min_sm 50)
endif()

function(_qwen3vl_oldest_sm architectures out)
    set(oldest "")
    foreach(arch IN LISTS architectures)
        if(arch MATCHES "^([0-9]+)")
            if(oldest STREQUAL "" OR CMAKE_MATCH_1 LESS oldest)
                set(oldest ${CMAKE_MATCH_1})
            endif()
        endif()
    endforeach()
    set(${out} "${oldest}" PARENT_SCOPE)
endfunction()

function(_qwen3vl_fail_old_sm sm where)
    if(sm LESS 70)
        set(hint "Pascal and older (SM ${sm}) need a CUDA 12.x toolkit")
    else()
        set(hint "SM ${sm} needs a CUDA 12.x toolkit")
    endif()
    message(FATAL_ERROR
        "${where} asks for SM ${sm}, but ${CMAKE_CUDA_COMPILER} is CUDA ${QWEN3VL_CUDA_VERSION}, which compiles "
        "for SM ${_qwen3vl_min_sm} and newer only. ${hint}: install CUDA 12.x (e.g. 12.8; it runs beside 13.x) and "
        "pass -DCMAKE_CUDA_COMPILER=/usr/local/cuda-12.8/bin/nvcc, or choose newer architectures with "
        "-DCMAKE_CUDA_ARCHITECTURES=75;86;89.")
endfunction()

if(DEFINED CMAKE_CUDA_ARCHITECTURES OR DEFINED ENV{CUDAARCHS})
    # The user's choice; only refuse what this toolkit cannot compile.
    if(DEFINED CMAKE_CUDA_ARCHITECTURES)
        set(_qwen3vl_requested "${CMAKE_CUDA_ARCHITECTURES}")
    else()
        set(_qwen3vl_requested "$ENV{CUDAARCHS}")
    endif()
    _qwen3vl_oldest_sm("${_qwen3vl_requested}" _qwen3vl_oldest)
    if(NOT _qwen3vl_oldest STREQUAL "" AND _qwen3vl_oldest LESS _qwen3vl_min_sm)
        _qwen3vl_fail_old_sm(${_qwen3vl_oldest} "CMAKE_CUDA_ARCHITECTURES=${_qwen3vl_requested}")
    endif()
else()
    set(_qwen3vl_detected "")
    find_program(QWEN3VL_NVIDIA_SMI nvidia-smi)
    if(QWEN3VL_NVIDIA_SMI)
        execute_process(
            COMMAND "${QWEN3VL_NVIDIA_SMI}" --query-gpu=compute_cap --format=csv,noheader
            OUTPUT_VARIABLE _qwen3vl_caps
            RESULT_VARIABLE _qwen3vl_smi_result
            ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
        if(_qwen3vl_smi_result EQUAL 0)
            string(REPLACE "\n" ";" _qwen3vl_caps "${_qwen3vl_caps}")
            foreach(cap IN LISTS _qwen3vl_caps)
                string(STRIP "${cap}" cap)
                if(cap MATCHES "^([0-9]+)\\.([0-9]+)$")
                    list(APPEND _qwen3vl_detected "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
                endif()
            endforeach()
            list(REMOVE_DUPLICATES _qwen3vl_detected)
        endif()
    endif()

    if(_qwen3vl_detected)
        _qwen3vl_oldest_sm("${_qwen3vl_detected}" _qwen3vl_oldest)
        if(_qwen3vl_oldest LESS _qwen3vl_min_sm)
            _qwen3vl_fail_old_sm(${_qwen3vl_oldest} "This machine's GPU")
        endif()
        set(_qwen3vl_architectures "${_qwen3vl_detected}")
        message(STATUS "CUDA architectures: ${_qwen3vl_architectures} (the GPUs of this machine)")
    elseif(QWEN3VL_CUDA_VERSION_MAJOR GREATER_EQUAL 13)
        # No GPU to ask, and Pascal out of this toolkit's reach: build the rest, say so loudly.
        set(_qwen3vl_architectures "75-real;86-real;89")
        message(WARNING
            "CUDA ${QWEN3VL_CUDA_VERSION} cannot compile for Pascal (SM 6.1), the project's main target: building "
            "for ${_qwen3vl_architectures} only. For MX250/GTX 10x0 GPUs install a CUDA 12.x toolkit and pass "
            "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-12.8/bin/nvcc.")
    else()
        set(_qwen3vl_architectures "61-real;75-real;86-real;89")
        message(STATUS "CUDA architectures: ${_qwen3vl_architectures} (no GPU found; PTX of 89 for newer GPUs)")
    endif()
    set(CMAKE_CUDA_ARCHITECTURES "${_qwen3vl_architectures}" CACHE STRING "CUDA architectures to build for")
endif()
