// Stand-in for the CUDA toolkit header of this name in CPU-emulated builds (see cuda_emulation.h).
#pragma once
#include "cuda_emulation.h"
