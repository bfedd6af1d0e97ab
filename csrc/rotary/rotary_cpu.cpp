// Rotary embedding, CPU kernel: OpenMP over tokens, the head_dim loop left to the compiler's
// vectorizer (contiguous, fp32 math). Contract and math: rotary.h. No torch headers here, so
// this file compiles in seconds; the tensor glue is in rotary_ops.cpp.
#include "common/cpu_types.h"
#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

namespace phi {
namespace {

// Elements rotated below which the kernel stays on the calling thread (~32 KiB of fp32 read).
constexpr int64_t kRotaryParallelElems = int64_t(1) << 13;

template <typename T>
inline void rotary_row_cpu(const T* x_in, T* out, const T* __restrict__ cos,
                           const T* __restrict__ sin, const Rotary_params& p) {
  const int half = p.rotary_dim / 2;
  if (!p.interleaved) {
    // Split loop keeps both halves unit-stride so it vectorizes; x_in may alias out, but each
    // pair is read completely before either element is written.
    #pragma omp simd
    for (int i = 0; i < half; ++i) {
      float o0, o1;
      rotary_rotate(to_float(x_in[i]), to_float(x_in[i + half]), to_float(cos[i]), to_float(sin[i]),
                    p.conjugate, o0, o1);
      out[i] = from_float<T>(o0);
      out[i + half] = from_float<T>(o1);
    }
  } else {
    for (int i = 0; i < half; ++i) {
      float o0, o1;
      rotary_rotate(to_float(x_in[2 * i]), to_float(x_in[2 * i + 1]), to_float(cos[i]),
                    to_float(sin[i]), p.conjugate, o0, o1);
      out[2 * i] = from_float<T>(o0);
      out[2 * i + 1] = from_float<T>(o1);
    }
  }
  if (!p.inplace) {
    for (int d = p.rotary_dim; d < p.head_dim; ++d) out[d] = x_in[d];
  }
}

template <typename T>
void rotary_cpu_typed(const Rotary_params& p) {
  const T* x = static_cast<const T*>(p.x_ptr);
  T* out = static_cast<T*>(p.out_ptr);
  const T* cos = static_cast<const T*>(p.cos_ptr);
  const T* sin = static_cast<const T*>(p.sin_ptr);
  const int half = p.rotary_dim / 2;
  const int64_t ntok = int64_t(p.batch) * p.seqlen;
  // A decoding step rotates one token: forking a team for it costs more than the work, and on a
  // busy machine the join waits for a descheduled thread (measured: 10 ms per call, 2 threads,
  // load 2, against 5 us single-threaded).
  const bool parallel = ntok * p.nheads * p.rotary_dim >= kRotaryParallelElems;
  #pragma omp parallel for schedule(static) if (parallel)
  for (int64_t bt = 0; bt < ntok; ++bt) {
    const int b = int(bt / p.seqlen);
    const int t = int(bt % p.seqlen);
    int64_t start;
    int len;
    rotary_seq_bounds(p, b, start, len);
    if (t >= len) continue;
    const int64_t pos = int64_t(t) + rotary_offset(p, b);
    const T* c = cos + pos * half;
    const T* s = sin + pos * half;
    const int64_t xo = rotary_x_offset(p, b, start + t);
    const int64_t oo = rotary_out_offset(p, b, start + t);
    for (int h = 0; h < p.nheads; ++h) {
      rotary_row_cpu<T>(x + xo + h * p.x_head_stride, out + oo + h * p.out_head_stride, c, s, p);
    }
  }
}

}  // namespace

void rotary_cpu(const Rotary_params& p) {
  switch (p.dtype) {
    case DType::kFloat32: rotary_cpu_typed<float>(p); break;
    case DType::kFloat16: rotary_cpu_typed<Half>(p); break;
    case DType::kBFloat16: rotary_cpu_typed<BFloat16>(p); break;
  }
}

}  // namespace phi
