/**
 * SGD with momentum, PyTorch's convention (the first step sets the buffer to the gradient):
 *   b = s g (first step) | mu b + s g ;  w -= lr b        (mu = 0: w -= lr s g)
 * One function for the accelerator's weights (float32) and the enclave's mirror of them in
 * the integrity checks (float64 projections), so the two can never drift apart.
 */
export type Vec = Float32Array | Float64Array;

// w[N] -= lr * b ; b[N] = (first ? 0 : mu b) + s g[N]  (buf null: no momentum)
export function sgdMomentumStep(w: Vec, g: Vec, buf: Vec | null, first: boolean, lr: number, mu: number, s: number): void {
  for (let i = 0; i < w.length; i++) {
    let gi = g[i] * s;
    if (buf) {
      const b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = b;
    }
    w[i] -= lr * gi;
  }
}
