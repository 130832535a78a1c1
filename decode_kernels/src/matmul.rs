//! A few rows times a weight matrix packed in panels: the products of a decode step.
//!
//! A decode step multiplies a handful of rows by every weight matrix, so it should cost about one read of the
//! weights whatever the row count. The weights come packed as panels [N / 16][K][16]: the 16 columns a pass
//! needs, contiguous in k order. A pass loads each 16-wide weight row once and uses it for up to 6 input
//! rows, keeping 6 x 16 sums in AVX2 registers. Every output is one chain of fused multiply-adds over k in
//! order, whatever the number of rows, the panels a thread was given, or the path (AVX2 or scalar).
//! Panels may be bfloat16 (the top half of a float32's bits): half the bytes to stream, widened exactly.

/// Columns per weight panel: two 8-wide AVX2 registers.
pub const PANEL: usize = 16;
/// Rows per pass over a panel: 6 rows x 2 accumulator registers + 2 weight registers + 1 broadcast = 15 of AVX2's 16.
const ROW_GROUP: usize = 6;
/// The most panels in one pass (panels_per_pass(1)).
const MAX_PASS: usize = 4;

type Accumulators = [[f32; PANEL]; ROW_GROUP];

/// Panels one pass multiplies at once for a group of `rows` rows. A fused multiply-add takes ~4 cycles before
/// its sum can take the next one, and a core starts 2 per cycle, so ~8 independent sums must be in flight:
/// one row over one panel has only 2 (its two 8-wide registers) and ran at a quarter of the core's speed.
/// More panels per pass add independent sums without changing any sum's own chain (exactness holds).
fn panels_per_pass(rows: usize) -> usize {
    match rows {
        1 => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// out[r, n] = residual[r, n] + sum_k x[r, k] w[k, n] (no residual: 0), then relu(.)^2 if asked; w in panels.
/// Raw pointers so that threads can share it, each writing the columns of its own panels only.
#[derive(Clone, Copy)]
pub struct Matmul {
    pub x: *const f32, // [rows, k]
    pub rows: usize,
    pub k: usize,
    pub panels: *const u8, // [ceil(n / 16), k, 16] of float32, or of bfloat16 when `bf16`
    pub bf16: bool,
    pub n: usize,
    pub out: *mut f32,         // [rows, n]
    pub residual: *const f32,  // [rows, n], or null: none (may be `out` itself: each output reads its own first)
    pub relu_squared: bool,    // the MLP's activation, applied to the product
}
// SAFETY: threads of one product read the same inputs and write disjoint columns of `out`
unsafe impl Send for Matmul {}
unsafe impl Sync for Matmul {}

impl Matmul {
    /// The columns of panels first_panel..last_panel, every row.
    /// SAFETY: the pointers hold the sizes above; `simd` only where crate::vectorized().
    pub unsafe fn run(&self, first_panel: usize, last_panel: usize, simd: bool) {
        let panel_bytes = self.k * PANEL * if self.bf16 { 2 } else { 4 };
        // rows split into equal groups (8 rows: 4 + 4, not 6 + 2): small groups waste the panel loads
        let groups = self.rows.div_ceil(ROW_GROUP);
        // a chunk of panels is read by every row group while it is still in cache
        for chunk in (first_panel..last_panel).step_by(MAX_PASS) {
            let chunk_end = (chunk + MAX_PASS).min(last_panel);
            let mut row = 0;
            for g in 0..groups {
                let group = self.rows * (g + 1) / groups - row;
                let mut p = chunk;
                while p < chunk_end {
                    let count = panels_per_pass(group).min(chunk_end - p);
                    let mut acc = [[[0.0f32; PANEL]; ROW_GROUP]; MAX_PASS];
                    panel_product(self.x.add(row * self.k), self.k, group, self.panels.add(p * panel_bytes), panel_bytes,
                                  count, self.bf16, &mut acc, simd);
                    for (i, sums_of_panel) in acc.iter().enumerate().take(count) {
                        self.store(row, group, p + i, sums_of_panel);
                    }
                    p += count;
                }
                row += group;
            }
        }
    }

    /// Rows row..row+group of panel p's columns: out = [residual +] sums, then relu^2 if asked.
    unsafe fn store(&self, row: usize, group: usize, p: usize, acc: &Accumulators) {
        let columns = (self.n - p * PANEL).min(PANEL);
        for (r, sums) in acc.iter().enumerate().take(group) {
            let at = (row + r) * self.n + p * PANEL;
            for (c, &sum) in sums.iter().enumerate().take(columns) {
                // the residual is added after the whole chain, never inside it
                let base = if self.residual.is_null() { 0.0 } else { *self.residual.add(at + c) };
                let value = base + sum;
                *self.out.add(at + c) = if self.relu_squared { value.max(0.0) * value.max(0.0) } else { value };
            }
        }
    }
}

/// A bfloat16 is the top 16 bits of a float32: widening it is exact, so both paths multiply the same numbers.
pub fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// acc[i][r][c] = sum over k of x[r, k] * panel i's [k, c], for `count` consecutive panels `panel_bytes` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(x: *const f32, k: usize, group: usize, panels: *const u8, panel_bytes: usize, count: usize,
                        bf16: bool, acc: &mut [Accumulators; MAX_PASS], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // the row and panel counts and the weight type are compile-time constants so the sums stay in registers
        macro_rules! dispatch {
            ($bf16:literal) => {
                match (group, count) {
                    (1, 4) => panel_avx2::<1, 4, $bf16>(x, k, panels, panel_bytes, acc),
                    (1, 3) => panel_avx2::<1, 3, $bf16>(x, k, panels, panel_bytes, acc),
                    (1, 2) => panel_avx2::<1, 2, $bf16>(x, k, panels, panel_bytes, acc),
                    (2, 2) => panel_avx2::<2, 2, $bf16>(x, k, panels, panel_bytes, acc),
                    (3, 2) => panel_avx2::<3, 2, $bf16>(x, k, panels, panel_bytes, acc),
                    (1, _) => panel_avx2::<1, 1, $bf16>(x, k, panels, panel_bytes, acc),
                    (2, _) => panel_avx2::<2, 1, $bf16>(x, k, panels, panel_bytes, acc),
                    (3, _) => panel_avx2::<3, 1, $bf16>(x, k, panels, panel_bytes, acc),
                    (4, _) => panel_avx2::<4, 1, $bf16>(x, k, panels, panel_bytes, acc),
                    (5, _) => panel_avx2::<5, 1, $bf16>(x, k, panels, panel_bytes, acc),
                    _ => panel_avx2::<6, 1, $bf16>(x, k, panels, panel_bytes, acc),
                }
            };
        }
        return if bf16 { dispatch!(true) } else { dispatch!(false) };
    }
    let _ = simd;
    for (i, sums_of_panel) in acc.iter_mut().enumerate().take(count) {
        let panel = panels.add(i * panel_bytes);
        let mut weights = [0.0f32; PANEL];
        for j in 0..k {
            for (c, w) in weights.iter_mut().enumerate() {
                *w = if bf16 { widen_bf16(*(panel as *const u16).add(j * PANEL + c)) } else { *(panel as *const f32).add(j * PANEL + c) };
            }
            for (r, sums) in sums_of_panel.iter_mut().enumerate().take(group) {
                let value = *x.add(r * k + j);
                for (sum, &w) in sums.iter_mut().zip(&weights) {
                    *sum = value.mul_add(w, *sum);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2<const R: usize, const P: usize, const BF16: bool>(x: *const f32, k: usize, panels: *const u8,
                                                                       panel_bytes: usize, acc: &mut [Accumulators; MAX_PASS]) {
    use std::arch::x86_64::*;
    let mut low = [[_mm256_setzero_ps(); R]; P];
    let mut high = [[_mm256_setzero_ps(); R]; P];
    for j in 0..k {
        for i in 0..P {
            let panel = panels.add(i * panel_bytes);
            let (w_low, w_high) = if BF16 {
                // 16 bfloat16 -> two registers of 8 float32: zero-extend each to 32 bits, shift into the top half
                let raw = _mm256_loadu_si256((panel as *const u16).add(j * PANEL) as *const __m256i);
                let low_half = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw));
                let high_half = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(raw));
                (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(low_half)), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(high_half)))
            } else {
                let panel = panel as *const f32;
                (_mm256_loadu_ps(panel.add(j * PANEL)), _mm256_loadu_ps(panel.add(j * PANEL + 8)))
            };
            for r in 0..R {
                let value = _mm256_set1_ps(*x.add(r * k + j));
                low[i][r] = _mm256_fmadd_ps(value, w_low, low[i][r]);
                high[i][r] = _mm256_fmadd_ps(value, w_high, high[i][r]);
            }
        }
    }
    for i in 0..P {
        for r in 0..R {
            _mm256_storeu_ps(acc[i][r].as_mut_ptr(), low[i][r]);
            _mm256_storeu_ps(acc[i][r].as_mut_ptr().add(8), high[i][r]);
        }
    }
}

/// Split `count` items into `threads` contiguous ranges and run them. The calling thread runs the first range
/// itself (rayon's in_place_scope), so a call wakes threads - 1 pool workers, not all of them while it sleeps.
pub fn parallel_ranges(count: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
    let threads = threads.clamp(1, count.max(1));
    if threads == 1 {
        return work(0, count);
    }
    let work = &work;
    rayon::in_place_scope(|scope| {
        for t in 1..threads {
            scope.spawn(move |_| work(count * t / threads, count * (t + 1) / threads));
        }
        work(0, count / threads);
    });
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::vectorized;

    /// w [k, n] row-major -> panels [ceil(n / 16), k, 16], the last padded with zero columns.
    pub fn pack<W: Copy + Default>(w: &[W], k: usize, n: usize) -> Vec<W> {
        let mut packed = vec![W::default(); n.div_ceil(PANEL) * k * PANEL];
        for i in 0..k {
            for j in 0..n {
                packed[(j / PANEL) * k * PANEL + i * PANEL + j % PANEL] = w[i * n + j];
            }
        }
        packed
    }

    fn matmul<W>(x: &[f32], rows: usize, k: usize, packed: &[W], n: usize, threads: usize, simd: bool) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        let job = Matmul { x: x.as_ptr(), rows, k, panels: packed.as_ptr() as *const u8, bf16: size_of::<W>() == 2, n,
                           out: out.as_mut_ptr(), residual: std::ptr::null(), relu_squared: false };
        parallel_ranges(n.div_ceil(PANEL), threads, |a, b| unsafe { job.run(a, b, simd) });
        out
    }

    #[test]
    fn rows_are_exact_whatever_the_batch_threads_or_path() {
        let (k, n, rows) = (37, 45, 11); // odd sizes: a partial panel and a partial row group
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 337.0).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 211.0).collect();
        let packed = pack(&w, k, n);
        let full = matmul(&x, rows, k, &packed, n, 1, vectorized());
        for r in 0..rows {
            let expected: Vec<f64> = (0..n).map(|j| (0..k).map(|i| x[r * k + i] as f64 * w[i * n + j] as f64).sum()).collect();
            for j in 0..n {
                assert!((full[r * n + j] as f64 - expected[j]).abs() < 1e-3, "wrong product at {r},{j}");
            }
        }
        for batch in 1..=rows {
            for threads in [1, 2, 3] {
                for simd in [false, vectorized()] {
                    let part = matmul(&x[..batch * k], batch, k, &packed, n, threads, simd);
                    assert_eq!(part[..], full[..batch * n], "batch {batch} threads {threads} simd {simd}");
                }
            }
        }
        // bfloat16 panels: the same product as float32 panels holding the bf16-rounded weights, in every path
        let bf16: Vec<u16> = packed.iter().map(|w| (w.to_bits() >> 16) as u16).collect();
        let rounded: Vec<f32> = bf16.iter().map(|&b| widen_bf16(b)).collect();
        let reference = matmul(&x, rows, k, &rounded, n, 1, false);
        for simd in [false, vectorized()] {
            for batch in [1, 4, rows] {
                let part = matmul(&x[..batch * k], batch, k, &bf16, n, 2, simd);
                assert_eq!(part[..], reference[..batch * n], "bf16 batch {batch} simd {simd}");
            }
        }
    }
}
