// The rotary and Adam CUDA launchers and kernels, compiled as host C++ for the SIMT emulator
// (PHI_SIMT): the same .cu sources nvcc compiles, included so only launch_kernel differs.
#include "adam/adam_cuda.cu"
#include "rotary/rotary_cuda.cu"
