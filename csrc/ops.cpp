// The one list of vtattn._C op schemas. CPU kernels register in csrc/cpu/,
// CUDA kernels in csrc/cuda/; the Python registry (vtattn._registry) wraps
// these in the public torch.ops.vtattn ops with fake impls and dispatch.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vtattn_C, m) {
  // Flash-style forward: out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32.
  // GQA (Hq % Hkv == 0); causal masks are aligned to the end (key j is visible
  // to row i when j <= i + Nk - Nq); rows that see no key give out 0, lse -inf.
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  // Sum over the chosen query rows of softmax(q k^T * scale) -> fp32 [B, Hq, Nk].
  // rows: int64 [B, R] of row indices, -1 entries skipped; None = every row.
  // lse: fp32 [B, Hq, Nq] of the rows' log-sum-exp; None = computed here.
  m.def("key_importance(Tensor q, Tensor k, Tensor? lse, Tensor? rows, bool causal, float scale) -> Tensor");
}

// Importing vtattn._C loads the library and so registers the ops above.
static struct PyModuleDef vtattn_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vtattn_c_module); }
