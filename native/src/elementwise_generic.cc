// Element-wise kernels for the baseline instruction set of the build.
#define EW_TABLE ew_generic
#include "elementwise_impl.h"
