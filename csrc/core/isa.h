// Instruction-set paths of the CPU expert kernels, chosen at run time.
//
// One binary runs everywhere: the AVX2 and AVX-512 kernels are compiled with
// per-function target attributes and only called when the CPU reports support.
#pragma once

namespace dali_cpu {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// Parses "portable", "avx2" or "avx512"; false for anything else.
bool parse_isa(const char* name, Isa* out);
// Whether this CPU (and this build's target architecture) can run `isa`.
bool isa_supported(Isa isa);
// The fastest supported path.
Isa best_isa();
// AVX-512 BF16 dot products (vdpbf16ps) on this CPU; only the AVX-512 path uses them.
bool cpu_has_avx512_bf16();
// AVX-512 VNNI (vpdpbusd) on this CPU; the AVX-512 path's int4 kernel uses it.
bool cpu_has_avx512_vnni();
// AMX with BF16 tiles (Sapphire Rapids and later), enabled by the OS (XCR0 tile state). ATen's bf16
// GEMM (oneDNN) runs on it several times faster than its fp32 GEMM; the kernels here never use AMX.
bool cpu_has_amx_bf16();

}  // namespace dali_cpu
