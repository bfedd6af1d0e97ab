// Host test of the math the rotary CUDA kernel runs (csrc/rotary/rotary.h) and of the
// fp16/bf16 conversions the CPU kernels use (csrc/common/cpu_types.h).
// Oracles: the compiler's own _Float16 (IEEE binary16 with correct rounding) and plain
// double-precision trigonometry.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_types.h"
#include "rotary/rotary.h"
#include "tests/host_test.h"

namespace {

void test_pair_index() {
  int i0, i1;
  phi::rotary_pair_index(3, 32, /*interleaved=*/false, i0, i1);
  HOST_CHECK(i0 == 3 && i1 == 19, "halves: got (%d, %d)", i0, i1);
  phi::rotary_pair_index(3, 32, /*interleaved=*/true, i0, i1);
  HOST_CHECK(i0 == 6 && i1 == 7, "interleaved: got (%d, %d)", i0, i1);
  // Every dim below rotary_dim belongs to exactly one pair, in both layouts.
  for (int inter = 0; inter < 2; ++inter) {
    int seen[64] = {0};
    for (int i = 0; i < 32; ++i) {
      phi::rotary_pair_index(i, 64, inter, i0, i1);
      ++seen[i0];
      ++seen[i1];
    }
    for (int d = 0; d < 64; ++d) HOST_CHECK(seen[d] == 1, "dim %d covered %d times (interleaved=%d)", d, seen[d], inter);
  }
}

void test_rotate() {
  for (int k = 0; k < 100; ++k) {
    const double theta = 0.37 * k - 11.0, x0 = std::sin(k * 1.3), x1 = std::cos(k * 0.7) * 2;
    float o0, o1, b0, b1;
    phi::rotary_rotate(float(x0), float(x1), float(std::cos(theta)), float(std::sin(theta)), false, o0, o1);
    const double e0 = x0 * std::cos(theta) - x1 * std::sin(theta), e1 = x1 * std::cos(theta) + x0 * std::sin(theta);
    HOST_CHECK(std::fabs(o0 - e0) < 1e-5 && std::fabs(o1 - e1) < 1e-5, "rotate k=%d", k);
    phi::rotary_rotate(o0, o1, float(std::cos(theta)), float(std::sin(theta)), true, b0, b1);  // conjugate undoes it
    HOST_CHECK(std::fabs(b0 - x0) < 1e-5 && std::fabs(b1 - x1) < 1e-5, "conjugate k=%d", k);
  }
}

void test_seq_bounds() {
  const int32_t cu[] = {0, 5, 5, 12};
  const int32_t offsets[] = {7, 0, 3};
  phi::Rotary_params p{};
  p.is_varlen = true;
  p.cu_seqlens = cu;
  p.seqlen_offsets = offsets;
  p.x_row_stride = 96;
  int64_t start;
  int len;
  phi::rotary_seq_bounds(p, 2, start, len);
  HOST_CHECK(start == 5 && len == 7, "varlen bounds: %lld %d", (long long)start, len);
  phi::rotary_seq_bounds(p, 1, start, len);
  HOST_CHECK(len == 0, "empty sequence: %d", len);
  HOST_CHECK(phi::rotary_offset(p, 0) == 7, "per-sequence offset");
  HOST_CHECK(phi::rotary_x_offset(p, 2, 6) == 6 * 96, "packed rows ignore the batch index");
  p.is_varlen = false;
  p.seqlen = 10;
  p.seqlen_offsets = nullptr;
  p.seqlen_offset = 4;
  p.x_batch_stride = 1000;
  phi::rotary_seq_bounds(p, 2, start, len);
  HOST_CHECK(start == 0 && len == 10, "padded bounds");
  HOST_CHECK(phi::rotary_offset(p, 1) == 4 && phi::rotary_x_offset(p, 2, 3) == 2000 + 3 * 96, "padded offsets");
}

void test_half_conversions() {
  // Every binary16 value converts exactly to float and back (NaNs stay NaN).
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const phi::Half h{uint16_t(bits)};
    const float f = phi::to_float(h);
    _Float16 ref;
    std::memcpy(&ref, &h.bits, 2);
    if (std::isnan(float(ref))) {
      HOST_CHECK(std::isnan(f), "half nan 0x%04x", bits);
      continue;
    }
    HOST_CHECK(f == float(ref), "half->float 0x%04x: %g vs %g", bits, f, float(ref));
    HOST_CHECK(phi::from_float<phi::Half>(f).bits == h.bits, "half round trip 0x%04x", bits);
  }
  // Rounding of floats that are not halves, against the compiler's _Float16 conversion:
  // midpoints, subnormals, overflow.
  uint32_t state = 12345;
  for (int k = 0; k < 200000; ++k) {
    state = state * 1664525u + 1013904223u;
    uint32_t u = state;
    if (k % 4 == 0) u = (u & 0x807fffffu) | (uint32_t(100 + (k % 50)) << 23);  // around the half range
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = (_Float16)f;
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    HOST_CHECK(phi::from_float<phi::Half>(f).bits == ref_bits, "float->half %a: 0x%04x vs 0x%04x", f,
               phi::from_float<phi::Half>(f).bits, ref_bits);
  }
}

void test_bf16_conversions() {
  // Round to nearest even on the 16 dropped bits: 1 + 2^-8 is a tie -> stays 1; just above rounds up.
  HOST_CHECK(phi::from_float<phi::BFloat16>(1.0f + 0.00390625f).bits == 0x3f80, "tie to even");
  HOST_CHECK(phi::from_float<phi::BFloat16>(1.0f + 0.0040f).bits == 0x3f81, "round up");
  HOST_CHECK(phi::to_float(phi::BFloat16{0x4049}) == 3.140625f, "bf16 -> float");
  HOST_CHECK(std::isnan(phi::to_float(phi::from_float<phi::BFloat16>(std::nanf("")))), "nan stays nan");
}

}  // namespace

int main() {
  test_pair_index();
  test_rotate();
  test_seq_bounds();
  test_half_conversions();
  test_bf16_conversions();
  std::printf("rotary_math_test: %d failure(s)\n", phi_test::failures());
  return phi_test::failures() == 0 ? 0 : 1;
}
