// The sum of a vector register's fp32 lanes, shared by the CPU kernels (flash attention, linear).
// Include it only from a kernel source compiled per capability by csrc/cpu_isa, after the
// wrapper has raised the target (never from a wrapper's baseline includes): the template is then
// instantiated for this build's register width, in an anonymous namespace, so each capability
// keeps its own copy.
#pragma once

namespace phi {
namespace {

// A tree of half-width adds (log2 lanes steps; a lane-by-lane loop compiles to a serial chain of
// shuffles and adds). A template so that only the branch of this build's width is instantiated.
template <typename V>
inline float lane_sum(V v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  typedef float Vec2 __attribute__((vector_size(8)));
  constexpr int kLanes = sizeof(V) / sizeof(float);
  Vec4 s4;
  if constexpr (kLanes == 16) {
    const Vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  } else if constexpr (kLanes == 8) {
    s4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  } else {
    static_assert(kLanes == 4, "a register of 4, 8 or 16 floats");
    s4 = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  }
  const Vec2 s2 = __builtin_shufflevector(s4, s4, 0, 1) + __builtin_shufflevector(s4, s4, 2, 3);
  return s2[0] + s2[1];
}

}  // namespace
}  // namespace phi
