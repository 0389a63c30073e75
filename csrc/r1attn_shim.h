// r1attn_shim.h: the C ABI between torch_r1attn's Python loader (ctypes) and a CUDA candidate.
//
// Why a C ABI and not a torch extension: a candidate builds with plain nvcc in seconds, on any
// machine with nvcc (no torch CUDA headers, no matching compiler/ABI), and the .so has no link
// to libtorch, so a torch upgrade can never make a cached kernel crash at load time.
//
// A candidate .cu includes this header and exports (extern "C"):
//   const char* r1attn_supports(void);          // SUPPORTS as JSON (+ "variant_tensors": [names])
//   int r1attn_forward(const r1attn_tensor* q, const r1attn_tensor* k, const r1attn_tensor* v,
//                      const r1attn_tensor* out, float scale,
//                      const r1attn_tensor* extras, int n_extras, cudaStream_t stream);
// r1attn_forward returns 0 on success, -1 for bad arguments, a cudaError_t for a failed launch;
// r1attn_last_error() (defined here) holds the message.
#pragma once

#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#define R1ATTN_ABI_VERSION 1

enum r1attn_dtype {
  R1_FP16 = 0, R1_BF16 = 1, R1_FP32 = 2, R1_FP64 = 3,
  R1_INT32 = 4, R1_INT64 = 5, R1_BOOL = 6, R1_INT8 = 7, R1_UINT8 = 8, R1_INT16 = 9,
};

// A strided view of a device tensor. Sizes and strides are in elements; unused dims are 1/0.
typedef struct r1attn_tensor {
  void* data;
  int32_t dtype;  // r1attn_dtype
  int32_t ndim;   // <= 4
  int64_t sizes[4];
  int64_t strides[4];
} r1attn_tensor;

static thread_local char r1attn_err_[512];

extern "C" int r1attn_abi_version(void) { return R1ATTN_ABI_VERSION; }
extern "C" const char* r1attn_last_error(void) { return r1attn_err_; }

static inline int r1attn_fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r1attn_err_, sizeof(r1attn_err_), fmt, ap);
  va_end(ap);
  return -1;
}

// Call right after the launch(es): reports launch-configuration errors without synchronizing.
static inline int r1attn_launch_status(void) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    snprintf(r1attn_err_, sizeof(r1attn_err_), "kernel launch failed: %s", cudaGetErrorString(e));
    return (int)e;
  }
  r1attn_err_[0] = 0;
  return 0;
}

#define R1_REQUIRE(cond, ...)                            \
  do {                                                   \
    if (!(cond)) return r1attn_fail(__VA_ARGS__);        \
  } while (0)
