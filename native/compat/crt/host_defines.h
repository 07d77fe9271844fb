/* Host-only stand-in for CUDA's crt/host_defines.h, used only where the CUDA runtime
 * headers come without it (the nvidia-cuda-runtime-cu12 wheel ships cuda_runtime_api.h
 * but not the compiler's crt/ folder). kvprof compiles no device code: the CUDA
 * qualifiers expand to nothing, alignment to GCC attributes. */
#ifndef KVPROF_COMPAT_HOST_DEFINES_H
#define KVPROF_COMPAT_HOST_DEFINES_H
#define __host__
#define __device__
#define __global__
#define __shared__
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(a) __align__(a)
#define __thread__ __thread
#define __import__
#define __export__
#define __cdecl
#define __annotate__(a) __attribute__((a))
#define __location__(a) __annotate__(a)
#define CUDARTAPI
#define CUDARTAPI_CDECL
#define __specialization_static
#define __device_builtin__
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
#define __cudart_builtin__
#define __launch_bounds__(...)
#define __grid_constant__
#define __nv_pure__
#endif
