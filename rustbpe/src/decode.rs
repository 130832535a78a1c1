//! Decode kernels for the chat server's continuous batching (nanochat/scheduler.py) on CPU, float32.
//!
//! Two reasons they exist instead of torch.mm and scaled_dot_product_attention:
//!
//! 1. Exactness. A greedy reply must be the same text whether its request is alone or shares each step
//!    with seven others. BLAS picks its kernel and its thread split by the number of rows, so the same row
//!    comes out with different rounding in a batch of 1, 3 or 8 (MKL: M = 1..3 use another kernel, M = 5..7
//!    split rows unevenly), and a near-tie in the logits then flips. Here every output number is one fixed
//!    chain of fused multiply-adds: the same chain for any number of rows, any thread split, and in the
//!    AVX2 path and the scalar fallback alike (a fused multiply-add rounds once, in a vector lane or not).
//! 2. Speed. A decode step multiplies a handful of rows by every weight matrix: it should cost about one
//!    read of the weights, whatever the row count. MKL's small-M sgemm on a 2-core AMD EPYC runs at ~20
//!    GFLOP/s, so 8 rows cost ~3x one row. Here a 16-column panel of the weights is loaded once per 6 rows.
//!
//! Weights come packed as panels [N / 16][K][16]: the 16 columns a pass needs are contiguous in k order.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// columns per weight panel: two 8-wide AVX2 registers
pub const PANEL: usize = 16;
/// rows per pass over a panel: 6 rows x 2 accumulator registers + 2 weight registers + 1 broadcast = 15 of AVX2's 16
const ROW_GROUP: usize = 6;
/// lanes of the partial sums in an attention dot product (one AVX2 register); fixed so every path sums alike
const DOT_LANES: usize = 8;

fn vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Raw pointers shared by the threads of one call; each thread writes its own outputs only.
#[derive(Clone, Copy)]
struct Matmul {
    x: *const f32,
    rows: usize,
    k: usize,
    panels: *const u8,    // float32 or bfloat16 (bf16: the top half of a float32's bits)
    bf16: bool,
    n: usize,
    out: *mut f32,
    residual: *const f32, // null: none
    relu_squared: bool,   // the MLP's activation, applied to the product
}
unsafe impl Send for Matmul {}
unsafe impl Sync for Matmul {}

type Accumulators = [[f32; PANEL]; ROW_GROUP];

impl Matmul {
    unsafe fn run(&self, first_panel: usize, last_panel: usize, simd: bool) {
        for p in first_panel..last_panel {
            let panel = self.panels.add(p * self.k * PANEL * if self.bf16 { 2 } else { 4 });
            let columns = (self.n - p * PANEL).min(PANEL);
            // rows split into equal groups (8 rows: 4 + 4, not 6 + 2): small groups waste the panel loads
            let groups = self.rows.div_ceil(ROW_GROUP);
            let mut row = 0;
            for g in 0..groups {
                let group = self.rows * (g + 1) / groups - row;
                let mut acc: Accumulators = [[0.0; PANEL]; ROW_GROUP];
                panel_product(self.x.add(row * self.k), self.k, group, panel, self.bf16, &mut acc, simd);
                for (r, sums) in acc.iter().enumerate().take(group) {
                    let at = (row + r) * self.n + p * PANEL;
                    for (c, &sum) in sums.iter().enumerate().take(columns) {
                        // the residual is added after the whole chain, never inside it
                        let base = if self.residual.is_null() { 0.0 } else { *self.residual.add(at + c) };
                        let value = base + sum;
                        *self.out.add(at + c) = if self.relu_squared { value.max(0.0) * value.max(0.0) } else { value };
                    }
                }
                row += group;
            }
        }
    }
}

/// A bfloat16 is the top 16 bits of a float32: widening it is exact, so both paths multiply the same numbers.
fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(x: *const f32, k: usize, group: usize, panel: *const u8, bf16: bool, acc: &mut Accumulators,
                        simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // the row count and the weight type are compile-time constants so the accumulators stay in registers
        macro_rules! dispatch {
            ($bf16:literal) => {
                match group {
                    1 => panel_avx2::<1, $bf16>(x, k, panel, acc),
                    2 => panel_avx2::<2, $bf16>(x, k, panel, acc),
                    3 => panel_avx2::<3, $bf16>(x, k, panel, acc),
                    4 => panel_avx2::<4, $bf16>(x, k, panel, acc),
                    5 => panel_avx2::<5, $bf16>(x, k, panel, acc),
                    _ => panel_avx2::<6, $bf16>(x, k, panel, acc),
                }
            };
        }
        return if bf16 { dispatch!(true) } else { dispatch!(false) };
    }
    let _ = simd;
    let mut weights = [0.0f32; PANEL];
    for i in 0..k {
        for (c, w) in weights.iter_mut().enumerate() {
            *w = if bf16 { widen_bf16(*(panel as *const u16).add(i * PANEL + c)) } else { *(panel as *const f32).add(i * PANEL + c) };
        }
        for (r, sums) in acc.iter_mut().enumerate().take(group) {
            let value = *x.add(r * k + i);
            for (sum, &w) in sums.iter_mut().zip(&weights) {
                *sum = value.mul_add(w, *sum);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2<const R: usize, const BF16: bool>(x: *const f32, k: usize, panel: *const u8, acc: &mut Accumulators) {
    use std::arch::x86_64::*;
    let mut low = [_mm256_setzero_ps(); R];
    let mut high = [_mm256_setzero_ps(); R];
    for i in 0..k {
        let (w_low, w_high) = if BF16 {
            // 16 bfloat16 -> two registers of 8 float32: zero-extend each to 32 bits, shift into the top half
            let raw = _mm256_loadu_si256((panel as *const u16).add(i * PANEL) as *const __m256i);
            let low_half = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw));
            let high_half = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(raw));
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(low_half)), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(high_half)))
        } else {
            let panel = panel as *const f32;
            (_mm256_loadu_ps(panel.add(i * PANEL)), _mm256_loadu_ps(panel.add(i * PANEL + 8)))
        };
        for r in 0..R {
            let value = _mm256_set1_ps(*x.add(r * k + i));
            low[r] = _mm256_fmadd_ps(value, w_low, low[r]);
            high[r] = _mm256_fmadd_ps(value, w_high, high[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(acc[r].as_mut_ptr(), low[r]);
        _mm256_storeu_ps(acc[r].as_mut_ptr().add(8), high[r]);
    }
}

/// Split `count` items into `threads` contiguous ranges and run them. The calling thread runs the first range
/// itself (rayon's in_place_scope), so a call wakes threads - 1 pool workers, not all of them while it sleeps.
fn parallel_ranges(count: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
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

/// A copy of the rows [rows, k], each normalized (`normalize`).
unsafe fn rms_normalized(x: *const f32, rows: usize, k: usize, simd: bool) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return rms_normalized_avx2(x, rows, k);
    }
    let _ = simd;
    rms_normalized_plain(x, rows, k)
}

// compiled with AVX2 + FMA: the lane loop becomes one vector multiply-add (a fused multiply-add either way)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_normalized_avx2(x: *const f32, rows: usize, k: usize) -> Vec<f32> {
    rms_normalized_plain(x, rows, k)
}

#[inline(always)]
unsafe fn rms_normalized_plain(x: *const f32, rows: usize, k: usize) -> Vec<f32> {
    let mut normalized = std::slice::from_raw_parts(x, rows * k).to_vec();
    normalized.chunks_exact_mut(k).for_each(normalize);
    normalized
}

/// a . b in DOT_LANES fixed lanes of fused multiply-adds, summed in a fixed pairwise order: the same bits
/// with or without vector registers (inlined into the AVX2-compiled callers, the lane loop is one vector FMA)
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; DOT_LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (a_chunk, b_chunk) in a_chunks.zip(b_chunks) {
        for l in 0..DOT_LANES {
            lanes[l] = a_chunk[l].mul_add(b_chunk[l], lanes[l]);
        }
    }
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])) + tail
}

/// Scale `row` to unit root-mean-square in place (parameter-free RMSNorm, eps = float32 epsilon as in nanochat/gpt.py).
#[inline(always)]
fn normalize(row: &mut [f32]) {
    let scale = 1.0 / (dot(row, row) / row.len() as f32 + f32::EPSILON).sqrt();
    row.iter_mut().for_each(|v| *v *= scale);
}

/// out[r, n] = residual[r, n] + sum_k x'[r, k] w[k, n] (no residual: 0), w packed by pack_panels;
/// x' = x, or each row RMS-normalized first (`normalize`); `relu_squared`: out = relu(out)^2.
/// Pointers are addresses of contiguous CPU buffers (panels in bfloat16 when `bf16`, all else float32);
/// nanochat/exact_decode.py checks them.
#[pyfunction]
#[pyo3(signature = (x, rows, k, panels, bf16, n, out, residual, normalize, relu_squared, threads))]
#[allow(clippy::too_many_arguments)]
pub fn decode_matmul(py: Python<'_>, x: usize, rows: usize, k: usize, panels: usize, bf16: bool, n: usize, out: usize,
                     residual: usize, normalize: bool, relu_squared: bool, threads: usize) -> PyResult<()> {
    if x == 0 || panels == 0 || out == 0 {
        return Err(PyValueError::new_err("decode_matmul: null buffer"));
    }
    let simd = vectorized();
    let normalized = if normalize { unsafe { rms_normalized(x as *const f32, rows, k, simd) } } else { Vec::new() };
    let x = if normalize { normalized.as_ptr() } else { x as *const f32 };
    let job = Matmul { x, rows, k, panels: panels as *const u8, bf16, n, out: out as *mut f32,
                       residual: residual as *const f32, relu_squared };
    py.detach(|| parallel_ranges(n.div_ceil(PANEL), threads, |first, last| unsafe { job.run(first, last, simd) }));
    Ok(())
}

#[derive(Clone, Copy)]
struct Attention {
    q: *const f32, // row r's query heads, ready to use: [heads, dim] at r * q_stride
    q_stride: usize,
    out: *mut f32, // [rows, heads, dim]
    keys: *mut f32, // this layer's keys: [slots, kv_heads, capacity, dim]; values follow at +value_offset
    value_offset: usize,
    capacity: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
}
unsafe impl Send for Attention {}
unsafe impl Sync for Attention {}

impl Attention {
    fn kv_at(&self, slot: usize, kv_head: usize, position: usize) -> usize {
        ((slot * self.kv_heads + kv_head) * self.capacity + position) * self.dim
    }

    /// softmax(q k / sqrt(dim)) v for one row and query head over positions 0..=position of its slot.
    #[inline(always)]
    unsafe fn head(&self, row: usize, head: usize, slot: usize, position: usize, scores: &mut Vec<f32>) {
        let dim = self.dim;
        let q = std::slice::from_raw_parts(self.q.add(row * self.q_stride + head * dim), dim);
        let kv_head = head / (self.heads / self.kv_heads);
        let start = self.kv_at(slot, kv_head, 0);
        let scale = 1.0 / (dim as f32).sqrt();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..=position {
            let key = std::slice::from_raw_parts(self.keys.add(start + j * dim), dim);
            let score = dot(q, key) * scale;
            max = max.max(score);
            scores.push(score);
        }
        let mut total = 0.0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            total += *score;
        }
        let out = std::slice::from_raw_parts_mut(self.out.add((row * self.heads + head) * dim), dim);
        out.fill(0.0);
        for (j, &weight) in scores.iter().enumerate() {
            let value = std::slice::from_raw_parts(self.keys.add(self.value_offset + start + j * dim), dim);
            for (o, &v) in out.iter_mut().zip(value) {
                *o = weight.mul_add(v, *o);
            }
        }
        for o in out.iter_mut() {
            *o /= total;
        }
    }

    unsafe fn heads_range(&self, first: usize, last: usize, slots: &[usize], positions: &[usize], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.heads_range_avx2(first, last, slots, positions);
        }
        let _ = simd;
        self.heads_range_plain(first, last, slots, positions)
    }

    #[inline(always)]
    unsafe fn heads_range_plain(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        let mut scores = Vec::with_capacity(positions.iter().max().map_or(1, |p| p + 1));
        for item in first..last {
            let (row, head) = (item / self.heads, item % self.heads);
            self.head(row, head, slots[row], positions[row], &mut scores);
        }
    }

    // the same code compiled with AVX2 + FMA: the lane loops above become vector instructions
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_range_avx2(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        self.heads_range_plain(first, last, slots, positions)
    }
}

/// The rotary angle and QK-norm of nanochat/gpt.py for one head: dst = rms_norm(x * cos + swap_halves(x) * sin),
/// with the tables' rows already in the [cos, cos] / [sin, -sin] form GPT._decode_tables builds.
#[inline(always)]
unsafe fn rotate_and_normalize(x: &[f32], cos: &[f32], sin: &[f32], dst: &mut [f32]) {
    let half = x.len() / 2;
    for d in 0..x.len() {
        let swapped = x[if d < half { d + half } else { d - half }];
        dst[d] = swapped.mul_add(sin[d], x[d] * cos[d]);
    }
    normalize(dst);
}

/// Inputs of one attention call: each row's q|k|v heads side by side (a row of the qkv matmul), the rotary tables.
struct Rows<'a> {
    qkv: *const f32,
    stride: usize,
    rotary: Option<(*const f32, *const f32)>, // cos, sin tables [positions, dim]; None: q and k are used as given
    slots: &'a [usize],
    positions: &'a [usize],
}

impl Attention {
    /// Per row: its query heads (rotated, normed) into `queries`, its key (rotated, normed) and value into the cache.
    #[inline(always)]
    unsafe fn prepare_plain(&self, rows: &Rows, queries: &mut [f32]) {
        let dim = self.dim;
        for (row, (&slot, &position)) in rows.slots.iter().zip(rows.positions).enumerate() {
            let source = rows.qkv.add(row * rows.stride);
            let head_of = |h: usize| std::slice::from_raw_parts(source.add(h * dim), dim);
            let tables = rows.rotary.map(|(cos, sin)| {
                (std::slice::from_raw_parts(cos.add(position * dim), dim), std::slice::from_raw_parts(sin.add(position * dim), dim))
            });
            let place = |x: &[f32], dst: &mut [f32]| match tables {
                Some((cos, sin)) => rotate_and_normalize(x, cos, sin, dst),
                None => dst.copy_from_slice(x),
            };
            for h in 0..self.heads {
                place(head_of(h), &mut queries[(row * self.heads + h) * dim..][..dim]);
            }
            for h in 0..self.kv_heads {
                let at = self.kv_at(slot, h, position);
                place(head_of(self.heads + h), std::slice::from_raw_parts_mut(self.keys.add(at), dim));
                let value = head_of(self.heads + self.kv_heads + h);
                std::slice::from_raw_parts_mut(self.keys.add(self.value_offset + at), dim).copy_from_slice(value);
            }
        }
    }

    unsafe fn prepare(&self, rows: &Rows, queries: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.prepare_avx2(rows, queries);
        }
        let _ = simd;
        self.prepare_plain(rows, queries)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prepare_avx2(&self, rows: &Rows, queries: &mut [f32]) {
        self.prepare_plain(rows, queries)
    }
}

/// One decode step's attention for rows at their own positions. Row r of `qkv` (row stride `stride` floats)
/// holds its heads side by side: `heads` query heads, then `kv_heads` key heads, then `kv_heads` value heads.
/// With rotary tables (cos, sin: [table_len, dim] addresses) q and k get the rotary angle of their position and
/// QK-norm first. Row r's key and value go to positions[r] of slot slots[r], then each query head attends over
/// positions 0..=positions[r] of that slot. out is [rows, heads, dim]; keys is one layer's
/// [slots, kv_heads, capacity, dim], its values at +value_offset floats.
#[pyfunction]
#[pyo3(signature = (qkv, stride, rotary, out, keys, value_offset, capacity, slots, positions, heads, kv_heads, dim, threads))]
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(py: Python<'_>, qkv: usize, stride: usize, rotary: Option<(usize, usize, usize)>, out: usize,
                        keys: usize, value_offset: usize, capacity: usize, slots: Vec<usize>, positions: Vec<usize>,
                        heads: usize, kv_heads: usize, dim: usize, threads: usize) -> PyResult<()> {
    let table_len = rotary.map_or(usize::MAX, |(_, _, len)| len);
    if [qkv, out, keys].contains(&0) || slots.len() != positions.len() || kv_heads == 0 || dim == 0
        || !heads.is_multiple_of(kv_heads) || stride < (heads + 2 * kv_heads) * dim
        || positions.iter().any(|&p| p >= capacity || p >= table_len) || rotary.is_some_and(|(c, s, _)| c == 0 || s == 0) {
        return Err(PyValueError::new_err("decode_attention: inconsistent buffers, positions or head counts"));
    }
    let job = Attention { q: std::ptr::null(), q_stride: heads * dim, out: out as *mut f32, keys: keys as *mut f32,
                          value_offset, capacity, heads, kv_heads, dim };
    let simd = vectorized();
    py.detach(|| {
        let rows = Rows { qkv: qkv as *const f32, stride, rotary: rotary.map(|(c, s, _)| (c as *const f32, s as *const f32)),
                          slots: &slots, positions: &positions };
        let mut queries = vec![0.0f32; slots.len() * heads * dim];
        unsafe { job.prepare(&rows, &mut queries, simd) };
        let job = Attention { q: queries.as_ptr(), ..job };
        parallel_ranges(slots.len() * heads, threads, |first, last| unsafe {
            job.heads_range(first, last, &slots, &positions, simd)
        });
    });
    Ok(())
}

/// Whether this CPU runs the AVX2 + FMA paths (else the scalar ones, same results, slower).
#[pyfunction]
pub fn decode_kernels_vectorized() -> bool {
    vectorized()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![0.0; panels * k * PANEL];
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
