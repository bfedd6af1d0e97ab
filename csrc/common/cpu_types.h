// 16-bit float storage types for the CPU kernels, with fp32 conversions.
//
// The CPU kernels are plain C++ (no torch headers, so they compile in seconds); they read
// fp16/bf16 as raw 16-bit words and do all math in fp32. Conversions round to nearest even,
// like the hardware and like torch's own casts, so CPU results match torch bit for bit.
#pragma once
#include <cstdint>
#include <cstring>

namespace phi {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

inline float to_float(Half h) {
  // IEEE binary16 -> binary32, exact (every half is a float).
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);  // +-0
    // Subnormal half: value = mant * 2^-24, exactly representable as a normal float.
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }

template <> inline BFloat16 from_float<BFloat16>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{uint16_t(u >> 16)};
}

template <> inline Half from_float<Half>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds to inf (>= 65520)
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: value / 2^-24 rounded to nearest even integer.
    // Adding 0.5f (2^-1) aligns the fp32 mantissa so hardware rounding does the work.
    float v = bits_to_float(abs) * 16777216.0f;  // exact scaling by 2^24
    float r = v + 8388608.0f - 8388608.0f;       // round to integer, ties to even
    return Half{uint16_t(sign | uint16_t(r))};
  }
  // Normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even.
  uint32_t m = abs + 0xfffu + ((abs >> 13) & 1u);
  m -= (112u << 23);
  return Half{uint16_t(sign | uint16_t(m >> 13))};
}

}  // namespace phi
