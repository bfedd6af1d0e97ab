// A tiny assertion helper for the standalone host tests (no framework needed).
#pragma once
#include <cstdio>
#include <cstdlib>

namespace phi_test {
inline int& failures() { static int n = 0; return n; }
}  // namespace phi_test

#define HOST_CHECK(cond, ...)                                          \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                               \
      std::fprintf(stderr, "\n");                                      \
      ++phi_test::failures();                                          \
    }                                                                  \
  } while (0)
