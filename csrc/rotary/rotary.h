// Rotary position embedding: the math shared by the CPU kernel (rotary_cpu.cpp) and the
// CUDA kernel (rotary_cuda.cu), and the params struct both see.
//
// Contract (checked in Python, phi_kernels/rotary.py, and again in rotary_ops.cpp):
//   x, out : (batch, seqlen, heads, head_dim), or packed (total_tokens, heads, head_dim) with
//            cu_seqlens; any strides on the first three dims, head_dim contiguous.
//   cos/sin: (seqlen_ro, rotary_dim / 2), contiguous, same dtype as x.
//   Token t of sequence b sits at position p = t + offset(b); it reads cos[p], sin[p].
//   Dims [0, rotary_dim) are rotated in pairs, dims [rotary_dim, head_dim) are copied
//   (when out != x), all in the same pass.
//   Pairs: non-interleaved (GPT-NeoX / phi "rotate_half"): (i, i + rotary_dim/2);
//          interleaved (GPT-J): (2i, 2i + 1); both use frequency i.
//   Rotation: [o0, o1] = [x0 c - x1 s, x1 c + x0 s]; conjugate (the backward) uses -s.
//   Math is fp32 whatever the storage type.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace phi {

struct Rotary_params {
  const void* x_ptr;
  void* out_ptr;
  const void* cos_ptr;
  const void* sin_ptr;
  const int32_t* cu_seqlens;       // (batch + 1,) or nullptr for the padded layout
  const int32_t* seqlen_offsets;   // (batch,) or nullptr: then every sequence uses seqlen_offset
  int64_t x_batch_stride, x_row_stride, x_head_stride;   // in elements; row = token
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int batch, seqlen, nheads, head_dim, rotary_dim;   // seqlen = max_seqlen when varlen
  int seqlen_ro;                                     // rows of cos/sin
  int seqlen_offset;
  bool interleaved, conjugate, is_varlen, inplace;
  DType dtype;
};

// Indices of the two elements of rotation pair `i` (0 <= i < rotary_dim / 2).
PHI_HOST_DEVICE void rotary_pair_index(int i, int rotary_dim, bool interleaved, int& i0, int& i1) {
  if (interleaved) {
    i0 = 2 * i;
    i1 = 2 * i + 1;
  } else {
    i0 = i;
    i1 = i + rotary_dim / 2;
  }
}

// Rotate one pair by angle theta given cos(theta) = c and sin(theta) = s.
PHI_HOST_DEVICE void rotary_rotate(float x0, float x1, float c, float s, bool conjugate, float& o0,
                                   float& o1) {
  if (conjugate) s = -s;
  o0 = x0 * c - x1 * s;
  o1 = x1 * c + x0 * s;
}

// Sequence start row and length of sequence b (padded or packed layout).
PHI_HOST_DEVICE void rotary_seq_bounds(const Rotary_params& p, int b, int64_t& start, int& len) {
  if (p.is_varlen) {
    start = PHI_LDG(p.cu_seqlens + b);
    len = PHI_LDG(p.cu_seqlens + b + 1) - int(start);
  } else {
    start = 0;
    len = p.seqlen;
  }
}

PHI_HOST_DEVICE int rotary_offset(const Rotary_params& p, int b) {
  return p.seqlen_offsets != nullptr ? PHI_LDG(p.seqlen_offsets + b) : p.seqlen_offset;
}

// Element offsets of token t of sequence b (row in the packed layout is start + t).
PHI_HOST_DEVICE int64_t rotary_x_offset(const Rotary_params& p, int b, int64_t row) {
  return p.is_varlen ? row * p.x_row_stride : b * p.x_batch_stride + row * p.x_row_stride;
}
PHI_HOST_DEVICE int64_t rotary_out_offset(const Rotary_params& p, int b, int64_t row) {
  return p.is_varlen ? row * p.out_row_stride : b * p.out_batch_stride + row * p.out_row_stride;
}

}  // namespace phi
