// vtattn_C::build_info() -> str: the facts of this build as JSON (torch version, CUDA targets, the
// hash of the sources...), compiled in so that they travel with the library and cannot go stale.
// setup.py writes them to vtattn_build_info.h in the build directory, never into the source tree.
#include <string>

#include <torch/library.h>

#include "vtattn_build_info.h"

TORCH_LIBRARY_FRAGMENT(vtattn_C, m) {
  m.def("build_info() -> str", []() -> std::string { return VTATTN_BUILD_INFO; });
}
