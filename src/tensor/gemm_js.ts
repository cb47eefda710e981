/**
 * Pure-TypeScript single-precision GEMM, used when the native addon is unavailable.
 *
 * C[m,n] = alpha * op(A) op(B) + beta * C (+ bias[n] on every row); row-major, BLAS semantics.
 * Arguments are assumed valid (gemm.ts checks them). Matrices are addressed as
 * (array, offset, leading dimension), so views never have to be materialised.
 *
 * Structure: beta and bias are applied to C first; then the reduction is split into
 * KC-deep steps and C into column blocks. An operand stored transposed has its block
 * transposed into a scratch buffer (reading its rows with unit stride), so one kernel
 * does all the work: 4 rows of C x 4 reduction steps of axpy over a cache-sized block of
 * row-major op(B) (unit stride in the inner loop, 16 multiply-adds per 4 loads of B).
 * Arithmetic is in double precision, rounded into C every 4 reduction steps.
 */

const KC = 256; // reduction depth per step
const NC = 512; // columns per block (KC x NC floats = 512 KiB of B per block)
const MC = 256; // rows of op(A) transposed at a time when A is stored transposed

let scratch = new Float32Array(0);
function scratchOf(n: number): Float32Array {
  if (scratch.length < n) scratch = new Float32Array(n);
  return scratch;
}

/** C = beta * C + bias over an m x n block; beta == 0 never reads C. */
function scaleC(m: number, n: number, beta: number, C: Float32Array, cOff: number, ldc: number, bias: Float32Array | null): void {
  for (let i = 0; i < m; i++) {
    const o = cOff + i * ldc;
    if (beta === 0) {
      if (bias) for (let j = 0; j < n; j++) C[o + j] = bias[j];
      else C.fill(0, o, o + n);
    } else if (beta === 1) {
      if (bias) for (let j = 0; j < n; j++) C[o + j] += bias[j];
    } else if (bias) {
      for (let j = 0; j < n; j++) C[o + j] = beta * C[o + j] + bias[j];
    } else {
      for (let j = 0; j < n; j++) C[o + j] *= beta;
    }
  }
}

/** C[mc, n] += alpha * A[mc, kc] B[kc, n]; A and B row-major. */
function kernelNN(mc: number, n: number, kc: number, alpha: number,
  A: Float32Array, aOff: number, lda: number, B: Float32Array, bOff: number, ldb: number,
  C: Float32Array, cOff: number, ldc: number): void {
  const k4 = kc - (kc % 4);
  const m4 = mc - (mc % 4);
  for (let jc = 0; jc < n; jc += NC) {
    const j1 = Math.min(n, jc + NC);
    let i = 0;
    for (; i < m4; i += 4) {
      const a0 = aOff + i * lda, a1 = a0 + lda, a2 = a1 + lda, a3 = a2 + lda;
      const c0 = cOff + i * ldc, c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
      let p = 0;
      for (; p < k4; p += 4) {
        const x00 = alpha * A[a0 + p], x01 = alpha * A[a0 + p + 1], x02 = alpha * A[a0 + p + 2], x03 = alpha * A[a0 + p + 3];
        const x10 = alpha * A[a1 + p], x11 = alpha * A[a1 + p + 1], x12 = alpha * A[a1 + p + 2], x13 = alpha * A[a1 + p + 3];
        const x20 = alpha * A[a2 + p], x21 = alpha * A[a2 + p + 1], x22 = alpha * A[a2 + p + 2], x23 = alpha * A[a2 + p + 3];
        const x30 = alpha * A[a3 + p], x31 = alpha * A[a3 + p + 1], x32 = alpha * A[a3 + p + 2], x33 = alpha * A[a3 + p + 3];
        const b0 = bOff + p * ldb, b1 = b0 + ldb, b2 = b1 + ldb, b3 = b2 + ldb;
        for (let j = jc; j < j1; j++) {
          const v0 = B[b0 + j], v1 = B[b1 + j], v2 = B[b2 + j], v3 = B[b3 + j];
          C[c0 + j] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3;
          C[c1 + j] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3;
          C[c2 + j] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3;
          C[c3 + j] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3;
        }
      }
      for (; p < kc; p++) {
        const x0 = alpha * A[a0 + p], x1 = alpha * A[a1 + p], x2 = alpha * A[a2 + p], x3 = alpha * A[a3 + p];
        const b0 = bOff + p * ldb;
        for (let j = jc; j < j1; j++) {
          const v = B[b0 + j];
          C[c0 + j] += x0 * v;
          C[c1 + j] += x1 * v;
          C[c2 + j] += x2 * v;
          C[c3 + j] += x3 * v;
        }
      }
    }
    for (; i < mc; i++) {
      const a0 = aOff + i * lda;
      const c0 = cOff + i * ldc;
      let p = 0;
      for (; p < k4; p += 4) {
        const x0 = alpha * A[a0 + p], x1 = alpha * A[a0 + p + 1], x2 = alpha * A[a0 + p + 2], x3 = alpha * A[a0 + p + 3];
        const b0 = bOff + p * ldb, b1 = b0 + ldb, b2 = b1 + ldb, b3 = b2 + ldb;
        for (let j = jc; j < j1; j++) C[c0 + j] += x0 * B[b0 + j] + x1 * B[b1 + j] + x2 * B[b2 + j] + x3 * B[b3 + j];
      }
      for (; p < kc; p++) {
        const x0 = alpha * A[a0 + p];
        const b0 = bOff + p * ldb;
        for (let j = jc; j < j1; j++) C[c0 + j] += x0 * B[b0 + j];
      }
    }
  }
}

/**
 * Transposes a rows x cols block: dst[c * rows + r] = src[sOff + r * ld + c], i.e. the block
 * of a matrix stored transposed becomes row-major (rows of the result are `rows` long).
 * Reads rows of the source (unit stride), four at a time.
 */
function transposeBlock(rows: number, cols: number, src: Float32Array, sOff: number, ld: number, dst: Float32Array): void {
  const r4 = rows - (rows % 4);
  let r = 0;
  for (; r < r4; r += 4) {
    const s0 = sOff + r * ld, s1 = s0 + ld, s2 = s1 + ld, s3 = s2 + ld;
    for (let c = 0; c < cols; c++) {
      const d = c * rows + r;
      dst[d] = src[s0 + c];
      dst[d + 1] = src[s1 + c];
      dst[d + 2] = src[s2 + c];
      dst[d + 3] = src[s3 + c];
    }
  }
  for (; r < rows; r++) {
    const s0 = sOff + r * ld;
    for (let c = 0; c < cols; c++) dst[c * rows + r] = src[s0 + c];
  }
}

/** One GEMM on (array, offset) operands. */
export function sgemmJsAt(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
  A: Float32Array, aOff: number, lda: number, B: Float32Array, bOff: number, ldb: number,
  beta: number, C: Float32Array, cOff: number, ldc: number, bias: Float32Array | null): void {
  if (m === 0 || n === 0) return;
  scaleC(m, n, beta, C, cOff, ldc, bias);
  if (k === 0 || alpha === 0) return;
  const nStep = transB ? NC : n;
  const mStep = transA ? MC : m;
  const bSize = transB ? KC * NC : 0;
  for (let pc = 0; pc < k; pc += KC) {
    const kc = Math.min(KC, k - pc);
    for (let jc = 0; jc < n; jc += nStep) {
      const nc = Math.min(nStep, n - jc);
      // The (kc x nc) block of op(B), row-major: B itself, or B^T's block transposed into scratch.
      let Bb = B, bBlock = bOff + pc * ldb + jc, ldbBlock = ldb;
      if (transB) {
        Bb = scratchOf(bSize + MC * KC);
        transposeBlock(nc, kc, B, bOff + jc * ldb + pc, ldb, Bb);
        bBlock = 0;
        ldbBlock = nc;
      }
      for (let ic = 0; ic < m; ic += mStep) {
        const mc = Math.min(mStep, m - ic);
        // The (mc x kc) block of op(A), row-major: A itself, or A^T's block transposed into scratch.
        let Ab = A, aBlock = aOff + ic * lda + pc, ldaBlock = lda;
        if (transA) {
          Ab = scratchOf(bSize + MC * KC);
          transposeBlock(kc, mc, A, aOff + pc * lda + ic, lda, Ab.subarray(bSize));
          Ab = Ab.subarray(bSize);
          aBlock = 0;
          ldaBlock = kc;
        }
        kernelNN(mc, nc, kc, alpha, Ab, aBlock, ldaBlock, Bb, bBlock, ldbBlock, C, cOff + ic * ldc + jc, ldc);
      }
    }
  }
}

export function sgemmBatchedJs(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
  A: Float32Array, lda: number, strideA: number, B: Float32Array, ldb: number, strideB: number,
  beta: number, C: Float32Array, ldc: number, strideC: number, batch: number): void {
  for (let b = 0; b < batch; b++) {
    sgemmJsAt(transA, transB, m, n, k, alpha, A, b * strideA, lda, B, b * strideB, ldb, beta, C, b * strideC, ldc, null);
  }
}
