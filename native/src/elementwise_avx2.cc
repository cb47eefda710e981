// Element-wise kernels compiled for AVX2 + FMA: this file is built as its own static library
// with that instruction set's compiler flags (binding.gyp), and only called after a run-time
// CPU check (elementwise.cc).
#define EW_TABLE ew_avx2
#define EW_VBYTES 32
#include "elementwise_impl.h"
