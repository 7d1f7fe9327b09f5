"""One core's fp32 peak: GFLOP/s of independent `<16 x float>` FMA chains, nothing else.

The blocked convolution's register block is such chains fed from memory; this is the
ceiling it and oneDNN's kernels are measured against (benchmarks/README.md). The loop body
is LLVM IR compiled by llvmlite for the host CPU: K accumulators, each `acc = acc·b + b`
per iteration (K independent chains hide the FMA's latency), all summed at the end so none
is dead code. Run it on a quiet machine:

    python benchmarks/fma_peak.py            # chains 8, 12, 16, 24
"""

import argparse
import ctypes
import time

import llvmlite.binding as llvm


def kernel_ir(K):
    """`float f(i64 n, float s)`: n iterations of K chained FMAs on splats of s."""
    lines = ["declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
             "define float @f(i64 %n, float %s) {", "entry:",
             "  %b0 = insertelement <16 x float> undef, float %s, i32 0",
             "  %b = shufflevector <16 x float> %b0, <16 x float> undef, "
             "<16 x i32> zeroinitializer", "  br label %loop", "loop:",
             "  %i = phi i64 [0, %entry], [%i1, %loop]"]
    lines += [f"  %a{k} = phi <16 x float> [%b, %entry], [%c{k}, %loop]" for k in range(K)]
    lines += [f"  %c{k} = call <16 x float> @llvm.fma.v16f32(<16 x float> %a{k}, "
              "<16 x float> %b, <16 x float> %b)" for k in range(K)]
    lines += ["  %i1 = add i64 %i, 1", "  %d = icmp slt i64 %i1, %n",
              "  br i1 %d, label %loop, label %exit", "exit:"]
    total = "%c0"
    for k in range(1, K):
        lines.append(f"  %s{k} = fadd <16 x float> {total}, %c{k}")
        total = f"%s{k}"
    lines += [f"  %r = extractelement <16 x float> {total}, i32 0", "  ret float %r", "}"]
    return "\n".join(lines)


def gflops(K, flops=4e9):
    """Best of 3 runs of about `flops` FLOPs each with K chains."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(kernel_ir(K)), target)
    engine.finalize_object()
    f = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_int64, ctypes.c_float)(
        engine.get_function_address("f"))
    n = int(flops / (K * 32))
    f(1000, 0.5)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(n, 0.999)
        best = min(best, time.perf_counter() - t)
    return n * K * 32 / best / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains", default="8,12,16,24")
    args = p.parse_args(argv)
    print(f"CPU {llvm.get_host_cpu_name()}, one thread, <16 x float> FMAs")
    for K in (int(k) for k in args.chains.split(",")):
        print(f"{K:3d} chains: {gflops(K):6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
