// Schemas of the msa:: operators and the Python module that loads them.
//
// Kernels register themselves per device in their own translation units
// (mscmat_cpu.cpp, cuda/mscmat_cuda.cu); fake (meta) kernels and autograd are
// registered from Python (msa/ops/_registration.py).

#include <Python.h>
#include <torch/library.h>

#include "block_cache.h"

TORCH_LIBRARY(msa, m) {
  // scores[i, j] = sum_h sum_l softmax_l(scale * <q[i,h], k[j,l,h]>) * <u[i,h], v[j,l,h]>
  // with the softmax over the words l where word_mask[j, l] is true (None: all words).
  m.def("mscmat_scores(Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, float scale) -> Tensor");
  // Computes only the gradients flagged in needs_grad (q, u, k, v) and returns empty tensors for the others.
  m.def(
      "mscmat_scores_backward(Tensor grad_scores, Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, "
      "float scale, bool[4] needs_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The forward used when gradients will be needed (CPU kernel only): with keep_softmax it also returns the
  // softmax p and logit_grads = p * (r - o) * scale (r the readouts, o the head's output) as [H, Nt, L, Ni]
  // tensors in the compute dtype (float32, or float64), so that the backward's dS and dR are g times them
  // instead of being recomputed; without, two empty tensors. Its backward honours needs_grad likewise.
  m.def(
      "mscmat_scores_for_grad(Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, float scale, "
      "bool keep_softmax) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mscmat_scores_for_grad_backward(Tensor grad_scores, Tensor q, Tensor u, Tensor k, Tensor v, "
      "Tensor? word_mask, Tensor probs, Tensor logit_grads, float scale, bool[4] needs_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

// Importing msa._C runs the static registrations above; the module itself only sizes the CPU block cache.
namespace {

PyObject* set_block_cache_limit(PyObject*, PyObject* arg) {
  const long long max_bytes = PyLong_AsLongLong(arg);
  if (max_bytes == -1 && PyErr_Occurred() != nullptr) {
    return nullptr;
  }
  return PyLong_FromLongLong(msa::set_block_cache_limit(max_bytes));
}

PyObject* block_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(msa::block_cache_bytes());
}

PyMethodDef methods[] = {
    {"set_block_cache_limit", set_block_cache_limit, METH_O,
     "set_block_cache_limit(max_bytes) -> int: the most bytes of freed blocks the CPU kernels hold for reuse; frees "
     "the oldest above it and returns the bytes still held."},
    {"block_cache_bytes", block_cache_bytes, METH_NOARGS, "block_cache_bytes() -> int: bytes of freed blocks held."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled kernels of msa, reached through torch.ops.msa.",
      -1,
      methods,
  };
  return PyModule_Create(&module_def);
}
}
