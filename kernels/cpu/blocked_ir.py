"""The blocked convolution's micro-kernel (kernels/cpu/blocked.py), written as LLVM IR from
a Numba intrinsic: `_conv_block` (up to 16 pixels × one or two blocks of 16 output
channels, the whole C×3×3 reduction in `<16 x float>` registers, each tap's body chosen by
the block's border case, then the bias, ReLU and the NCHW stores), and
the helpers `blocked_grad.py` and `blocked_nchw.py` share (`emit_transpose`, pointers,
splats, the FMA). blocked.py's docstring tells the design and what was measured; this
module only emits it.

NOTE: Numba's disk cache keys a compiled function on its own file (its time stamp and
size), not on the intrinsics it calls: a change here reaches a cached caller only with a
change to its file (blocked.py, blocked_grad.py, blocked_grad_rgb.py) or a cleared
`__pycache__`.
"""

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 16  # channels per block: one zmm register of fp32
# Pixels per row of a register block (of 2 rows: 16 accumulators + a filter vector, of 32
# zmm registers). NOTE: more (12, 14) leaves fewer pixels wasted on 12·k- or 14·k-wide maps
# but more on the 8·k-wide ones; maps 4 wide take blocks of 4 rows of 4.
PIX = 8

_F32 = ir.FloatType()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16 = ir.VectorType(_F32, BLOCK)


# ----------------------------------------------------------------------------------------
# The AVX-512 micro-kernel, as LLVM IR emitted from Numba
# ----------------------------------------------------------------------------------------

def tune_scheduling(builder):
    """Have LLVM schedule the function being built (the caller the micro-kernel is emitted
    into) by Intel's Skylake-AVX512 model, whatever the host CPU: the function attribute
    "tune-cpu" changes the instruction scheduling only, not which instructions may be used.

    NOTE: on AMD Zen 4 (LLVM's znver4 model) the machine scheduler moves the next input
    channel's broadcasts above this channel's FMAs to hide load latency, runs out of the 32
    zmm registers and spills 63-84 of them to the stack per tap of the two-block shapes
    (measured when every map took them; now only maps 1-3 wide do; tests/test_blocked.py
    counts the spills). Scheduled as for Skylake, the same IR keeps
    every accumulator in a register: the forward pass of the small recipe's layers took 10-13%
    less CPU time on one thread, the backward (whose input gradient is this kernel) 2-7%
    (AMD EPYC Zen 4, 2026-12-05, best of 15, `blocked_conv2d_forward` and
    `blocked_conv2d_backward`). llvmlite lets only its known attribute names through
    `attributes.add`; a string attribute goes in as the set's item.
    """
    set.add(builder.function.attributes, '"tune-cpu"="skylake-avx512"')


def _float_pointer(context, builder, array_type, array, index):
    """A float* to element `index` of a Numba array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _vector_pointer(builder, ptr):
    return builder.bitcast(ptr, _V16.as_pointer())


def _splat(builder, value):
    """<16 x float> with every lane = value (becomes an embedded {1to16} broadcast)."""
    one = builder.insert_element(ir.Constant(_V16, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_V16, ir.Undefined),
                                 ir.Constant(ir.VectorType(_I32, BLOCK), [0] * BLOCK))


def _fma(builder):
    fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")


def _emit_tap(builder, fma, acc, xptr, istride, rstride, pw, wptr, wstep, nic=BLOCK,
              keep=lambda p: True):
    """acc[k][p] += x[ic, p] · w_k[ic, :] for the first nic of the 16 input channels ic of
    one tap (unrolled),
    for each output-channel block k, whose filters lie `wstep` floats after block k-1's.
    x[ic, p] is xptr[ic·istride + (p // pw)·rstride + p % pw]: rows of pw pixels side by
    side, one channel plane after another (a zero-bordered NCHW image). Only the pixels p
    with keep(p) are summed (the others would read x's zero border)."""
    values = [[builder.load(a) for a in row] for row in acc]
    for ic in range(nic):
        w = [builder.load(_vector_pointer(builder, builder.gep(wptr, [builder.add(
            builder.mul(wstep, ir.Constant(_I64, k)), ir.Constant(_I64, ic * BLOCK))])),
            align=4) for k in range(len(acc))]
        xc = builder.gep(xptr, [builder.mul(istride, ir.Constant(_I64, ic))])
        for p in (p for p in range(len(acc[0])) if keep(p)):
            at = builder.add(builder.mul(rstride, ir.Constant(_I64, p // pw)),
                             ir.Constant(_I64, p % pw))
            x = _splat(builder, builder.load(builder.gep(xc, [at]), align=4))
            for k in range(len(acc)):
                values[k][p] = builder.call(fma, [x, w[k], values[k][p]])
    for row, vrow in zip(acc, values):
        for a, v in zip(row, vrow):
            builder.store(v, a)


def _opaque(builder, value):
    """An i64 equal to `value` that LLVM cannot see through (an empty inline asm)."""
    return builder.asm(ir.FunctionType(_I64, [_I64]), "", "=r,0", [ir.Constant(_I64, value)],
                       False)


def _edge_select(builder, k, edges, first_bit):
    """0, or 1 when tap index k is 0 and bit `first_bit` of edges is set (the block starts
    the map's row or column), or 2 when k is 2 and bit first_bit + 1 is (it ends it)."""
    def on(bit, at):
        set_ = builder.icmp_signed("!=", builder.and_(edges, ir.Constant(_I64, 1 << bit)),
                                   ir.Constant(_I64, 0))
        return builder.and_(set_, builder.icmp_signed("==", k, ir.Constant(_I64, at)))
    one, two, zero = (ir.Constant(_I64, v) for v in (1, 2, 0))
    return builder.select(on(first_bit, 0), one,
                          builder.select(on(first_bit + 1, 2), two, zero))


def _emit_edge_taps(builder, emit, rows, pw, ky, kx, edges):
    """emit(keep) once per border case, chosen at run time: a tap at kx = 0 on a block
    that starts its row leaves out each row's first pixel (it would read x's left border),
    kx = 2 on one that ends the row its last; with rows > 1, ky = 0 on a block on the map's
    first row leaves out the block's first row, ky = 2 on one on its last row the last.
    edges: bit 0 starts the row, bit 1 ends it, bit 2 first row, bit 3 last row."""
    sel = _edge_select(builder, kx, edges, 0)
    if rows > 1:
        sel = builder.add(sel, builder.mul(_edge_select(builder, ky, edges, 2),
                                           ir.Constant(_I64, 3)))
    after = builder.append_basic_block("taps.done")
    cases = [(c % 3, c // 3) for c in range(3 if rows == 1 else 9)]
    blocks = [builder.append_basic_block(f"taps.case{c}") for c in range(len(cases))]
    switch = builder.switch(sel, blocks[0])
    for c, ((px, row), block) in enumerate(zip(cases, blocks)):
        switch.add_case(ir.Constant(_I64, c), block)
        builder.position_at_end(block)
        emit(lambda p, px=px, row=row: not (
            (px == 1 and p % pw == 0) or (px == 2 and p % pw == pw - 1)
            or (row == 1 and p // pw == 0) or (row == 2 and p // pw == rows - 1)))
        builder.branch(after)
    builder.position_at_end(after)


def _emit_reduction(builder, acc, x_at, w_at, CB, istride, rstride, pw, wstep, nic, ky0, ky1,
                    edges=None):
    """The loops cb, ky, kx around `_emit_tap`: x_at/w_at are float* to the block's first
    tap (cb = ky = kx = 0); a block of 16 input channels is 16 planes of x, and the filter
    block of one tap is 16×16 floats. ky runs from ky0 to ky1: a block of one row on the
    map's first or last row skips the row of taps that would read only x's zero border
    (the products left out are zeros: with finite weights the sums keep their bits). With
    `edges` (a run-time bit set, `_emit_edge_taps`), each tap also leaves out the pixels
    and rows of the block whose input is the border; its bodies are chosen per tap at run
    time, and kx's count is hidden from LLVM (`_opaque`) so that it does not unroll the
    taps into one body and share input values across them (that spilled registers)."""
    fma = _fma(builder)
    for a in (a for row in acc for a in row):
        builder.store(ir.Constant(_V16, [0.0] * BLOCK), a)
    cstride = builder.mul(istride, ir.Constant(_I64, BLOCK))
    rows = len(acc[0]) // pw
    with cgutils.for_range(builder, CB) as cb:
        xc = builder.gep(x_at, [builder.mul(cb.index, cstride)])
        wc = builder.gep(w_at, [builder.mul(cb.index, ir.Constant(_I64, 9 * BLOCK * BLOCK))])
        with cgutils.for_range_slice(builder, ky0, ky1, ir.Constant(_I64, 1)) as (ky, _):
            xr = builder.gep(xc, [builder.mul(ky, rstride)])
            wr = builder.gep(wc, [builder.mul(ky, ir.Constant(_I64, 3 * BLOCK * BLOCK))])
            three = ir.Constant(_I64, 3) if edges is None else _opaque(builder, 3)
            with cgutils.for_range(builder, three) as kx:
                xt = builder.gep(xr, [kx.index])
                wt = builder.gep(wr, [builder.mul(kx.index, ir.Constant(_I64, BLOCK * BLOCK))])

                def emit(keep):
                    _emit_tap(builder, fma, acc, xt, istride, rstride, pw, wt, wstep, nic,
                              keep)
                if edges is None:
                    emit(lambda p: True)
                else:
                    _emit_edge_taps(builder, emit, rows, pw, ky, kx.index, edges)


@functools.cache
def _transpose_plan(P):
    """Shuffles that turn P vectors of 16 channels (one per pixel) into P vectors of 16/P
    channels × P pixels each, channel-major: stages of [(a, b, mask)], each a two-vector
    shufflevector, log2(P) stages of P; and the final vectors' (pixel, channel) lanes."""
    vecs = [[(p, o) for o in range(BLOCK)] for p in range(P)]
    plan = []
    while len({p for p, _ in vecs[0]}) < P:
        groups = {}
        for idx, v in enumerate(vecs):
            groups.setdefault(tuple(sorted({o for _, o in v})), []).append(
                (min(p for p, _ in v), idx))
        stage, new = [], []
        for chans, members in groups.items():
            members.sort()
            for (_, a), (_, b) in zip(members[0::2], members[1::2]):
                pix = sorted({p for p, _ in vecs[a] + vecs[b]})
                for part in (chans[:len(chans) // 2], chans[len(chans) // 2:]):
                    lanes = [(p, o) for o in part for p in pix]
                    stage.append((a, b, [vecs[a].index(q) if q in vecs[a]
                                         else BLOCK + vecs[b].index(q) for q in lanes]))
                    new.append(lanes)
        plan.append(stage)
        vecs = new
    return plan, vecs


def emit_transpose(builder, vectors):
    """`_transpose_plan`'s shuffles on P `<16 x float>` vectors -> (the P vectors of 16/P
    channels × P pixels, their (pixel, channel) lanes)."""
    plan, lanes = _transpose_plan(len(vectors))
    for stage in plan:
        vectors = [builder.shuffle_vector(vectors[a], vectors[b], ir.Constant(
            ir.VectorType(_I32, len(mask)), mask)) for a, b, mask in stage]
    return vectors, lanes


def _emit_store_nchw(builder, vectors, y_at, ycs, yrow, pw, valid, vrows, real):
    """y_at[o·ycs + r·yrow + j] = vectors[r·pw + j][o] for o < real channels, rows r < vrows
    and pixels j < valid of each row: the P vectors transposed in registers
    (`_transpose_plan`), then one masked pw-float store per channel and row
    (`llvm.masked.store`: pixels past a row's end are not written; another thread may be
    writing there)."""
    P = len(vectors)
    vectors, lanes = emit_transpose(builder, vectors)
    rows = {}  # (channel, row) -> <pw x float>
    for v, lane in zip(vectors, lanes):
        for k in range(0, BLOCK, pw):
            rows[lane[k - k % P][1], k % P // pw] = v if pw == BLOCK else builder.shuffle_vector(
                v, ir.Constant(_V16, ir.Undefined),
                ir.Constant(ir.VectorType(_I32, pw), list(range(k, k + pw))))
    vt, vi = ir.VectorType(_F32, pw), ir.VectorType(_I64, pw)
    splat = builder.shuffle_vector(
        builder.insert_element(ir.Constant(vi, ir.Undefined), valid, ir.Constant(_I32, 0)),
        ir.Constant(vi, ir.Undefined), ir.Constant(ir.VectorType(_I32, pw), [0] * pw))
    mask = builder.icmp_signed("<", ir.Constant(vi, list(range(pw))), splat)
    store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.VoidType(), [vt, vt.as_pointer(), _I32, mask.type]), f"llvm.masked.store.v{pw}f32.p0")
    for o in range(BLOCK):
        with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, o), real), likely=True):
            for r in range(P // pw):
                at = builder.bitcast(builder.gep(y_at, [builder.add(
                    builder.mul(ycs, ir.Constant(_I64, o)),
                    builder.mul(yrow, ir.Constant(_I64, r)))]), vt.as_pointer())
                inside = builder.icmp_signed("<", ir.Constant(_I64, r), vrows)
                with builder.if_then(inside, likely=True):
                    builder.call(store, [rows[o, r], at, ir.Constant(_I32, 4), mask])


def _emit_epilogue(builder, acc, bias, y_at, shape, relu):
    """acc + bias (then max(·, 0) if relu; NaN stays NaN), written out in NCHW by
    `_emit_store_nchw`, shape = its (ycs, yrow, pw, valid, vrows, real)."""
    zero = ir.Constant(_V16, [0.0] * BLOCK)
    vectors = []
    for a in acc:
        v = builder.fadd(builder.load(a), bias)
        clipped = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
        vectors.append(builder.select(relu, clipped, v))
    _emit_store_nchw(builder, vectors, y_at, *shape)


@intrinsic(prefer_literal=True)
def _conv_block(typingctx, xp, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs,
                yrow, valid, vrows, ochans, relu, ky0, ky1, edges, pix, nob, pw, nic, edge):
    """For k < `nob` output-channel blocks, `pix` pixels in rows of `pw` (literals), of which
    rows r < vrows and pixels j < valid of each, and o < ochans - 16k channels:
    y.flat[y0 + (16k + o)·ycs + r·yrow + j] = bias + the sum over (cb, ky0 <= ky < ky1,
    kx, ic) of
    xp.flat[x0 + (16cb + ic)·istride + (ky + r)·rstride + j + kx] ·
    wb.flat[w0 + k·wstep + ((cb·9 + 3ky + kx)·16 + ic)·16 + o], bias = bb.flat[b0 + 16k + o]:
    x a zero-bordered image, one plane per channel, and y NCHW. Only the first `nic` (a
    literal) input channels of each block are summed: the others must be zeros (a layer of
    C < 16 channels, nic = C rounded up to 4, skips the zero planes of its block). With
    `edge` (a literal) the products that read x's zero border are left out, as the bits of
    `edges` say (bit 0: the block starts its row, 1: ends it, 2: its first row is the map's
    first, 3: its last row the map's last; `_emit_edge_taps`): zeros, so with finite
    weights the sums keep their bits."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (pix, nob, pw, nic)):
        return None
    if not isinstance(edge, types.BooleanLiteral):
        return None
    i = types.intp

    def codegen(context, builder, sig, args):
        (xp_, x0_, is_, rs_, CB_, wb_, w0_, ws_, bb_, b0_, y_, y0_, ycs_, yrow_, valid_, vrows_,
         ochans_, relu_, ky0_, ky1_, edges_, _, _, _, _, _) = args
        ta = sig.args
        tune_scheduling(builder)
        acc = [[cgutils.alloca_once(builder, _V16) for _ in range(pix.literal_value)]
               for _ in range(nob.literal_value)]
        x_at = _float_pointer(context, builder, ta[0], xp_, x0_)
        w_at = _float_pointer(context, builder, ta[5], wb_, w0_)
        _emit_reduction(builder, acc, x_at, w_at, CB_, is_, rs_, pw.literal_value, ws_,
                        nic.literal_value, ky0_, ky1_, edges_ if edge.literal_value else None)
        for k, row in enumerate(acc):
            b_k = builder.add(b0_, ir.Constant(_I64, k * BLOCK))
            bias = builder.load(_vector_pointer(
                builder, _float_pointer(context, builder, ta[8], bb_, b_k)), align=4)
            y_k = builder.add(y0_, builder.mul(ycs_, ir.Constant(_I64, k * BLOCK)))
            y_at = _float_pointer(context, builder, ta[10], y_, y_k)
            real = builder.sub(ochans_, ir.Constant(_I64, k * BLOCK))
            _emit_epilogue(builder, row, bias, y_at, (ycs_, yrow_, pw.literal_value, valid_,
                                                      vrows_, real), relu_)
        return context.get_dummy_value()

    return (types.void(xp, i, i, i, i, wb, i, i, bb, i, y, i, i, i, i, i, i, types.boolean,
                       i, i, i, pix, nob, pw, nic, edge), codegen)


@intrinsic
def _turn_block(typingctx, x, x0, xstride, out, o0):
    """out.flat[o0 + 16q + c] = x.flat[x0 + c·xstride + q] for c, q < 16: 16 channels × 16
    pixels turned in registers (16 loads, `emit_transpose`'s 64 shuffles, 16 stores)."""
    def codegen(context, builder, sig, args):
        x_, x0_, xs_, out_, o0_ = args
        src = _float_pointer(context, builder, sig.args[0], x_, x0_)
        dst = _float_pointer(context, builder, sig.args[3], out_, o0_)
        vectors = [builder.load(_vector_pointer(builder, builder.gep(
            src, [builder.mul(xs_, ir.Constant(_I64, c))])), align=4) for c in range(BLOCK)]
        vectors, lanes = emit_transpose(builder, vectors)
        for v, lane in zip(vectors, lanes):
            at = builder.gep(dst, [ir.Constant(_I64, BLOCK * lane[0][1])])
            builder.store(v, _vector_pointer(builder, at), align=4)
        return context.get_dummy_value()

    i = types.intp
    return types.void(x, i, i, out, i), codegen
