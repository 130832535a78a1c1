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

/// The most panels in one pass (panels_per_pass(1)).
const MAX_PASS: usize = 4;

impl Matmul {
    unsafe fn run(&self, first_panel: usize, last_panel: usize, simd: bool) {
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
fn widen_bf16(bits: u16) -> f32 {
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
    let whole = a.len() / DOT_LANES * DOT_LANES;
    let mut lanes = [0.0f32; DOT_LANES];
    for (a_chunk, b_chunk) in a[..whole].chunks_exact(DOT_LANES).zip(b[..whole].chunks_exact(DOT_LANES)) {
        for l in 0..DOT_LANES {
            lanes[l] = a_chunk[l].mul_add(b_chunk[l], lanes[l]);
        }
    }
    sum_lanes(&lanes, a, b, whole)
}

/// The fixed pairwise sum of a dot product's lanes, plus the products past the last whole lane group.
#[inline(always)]
fn sum_lanes(lanes: &[f32; DOT_LANES], a: &[f32], b: &[f32], whole: usize) -> f32 {
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])) + tail
}

/// `dot` of 4 keys at once in AVX2: 4 independent chains of vector multiply-adds, where one dot product's single
/// chain waits ~4 cycles per step (attention scores ~3x faster). Each lane is the same fused multiply-add as
/// the scalar path's, so the bits are too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots4_avx2(a: &[f32], bs: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let whole = a.len() / DOT_LANES * DOT_LANES;
    let mut sums = [_mm256_setzero_ps(); 4];
    for start in (0..whole).step_by(DOT_LANES) {
        let a_lanes = _mm256_loadu_ps(a.as_ptr().add(start));
        for (sum, b) in sums.iter_mut().zip(&bs) {
            *sum = _mm256_fmadd_ps(a_lanes, _mm256_loadu_ps(b.as_ptr().add(start)), *sum);
        }
    }
    std::array::from_fn(|i| {
        let mut lanes = [0.0f32; DOT_LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums[i]);
        sum_lanes(&lanes, a, bs[i], whole)
    })
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
    unsafe fn head<const SIMD: bool>(&self, row: usize, head: usize, slot: usize, position: usize, scores: &mut Vec<f32>) {
        let dim = self.dim;
        let q = std::slice::from_raw_parts(self.q.add(row * self.q_stride + head * dim), dim);
        let kv_head = head / (self.heads / self.kv_heads);
        let start = self.kv_at(slot, kv_head, 0);
        let scale = 1.0 / (dim as f32).sqrt();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        let key = |j: usize| std::slice::from_raw_parts(self.keys.add(start + j * dim), dim);
        let keys = position + 1;
        for j in (0..keys / 4 * 4).step_by(4) {
            let four = [key(j), key(j + 1), key(j + 2), key(j + 3)];
            #[cfg(target_arch = "x86_64")]
            if SIMD {
                scores.extend(dots4_avx2(q, four));
                continue;
            }
            scores.extend(four.map(|key| dot(q, key)));
        }
        for j in keys / 4 * 4..keys {
            scores.push(dot(q, key(j)));
        }
        for score in scores.iter_mut() {
            *score *= scale;
            max = max.max(*score);
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
        self.heads_range_plain::<false>(first, last, slots, positions)
    }

    #[inline(always)]
    unsafe fn heads_range_plain<const SIMD: bool>(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        let mut scores = Vec::with_capacity(positions.iter().max().map_or(1, |p| p + 1));
        for item in first..last {
            let (row, head) = (item / self.heads, item % self.heads);
            self.head::<SIMD>(row, head, slots[row], positions[row], &mut scores);
        }
    }

    // the same code compiled with AVX2 + FMA: the lane loops above become vector instructions
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_range_avx2(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        self.heads_range_plain::<true>(first, last, slots, positions)
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

/// One block's weights for DecodeModel: addresses of packed panels and tables that nanochat/exact_decode.py
/// keeps alive as long as the model object.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    qkv: usize,                    // panels [width -> (heads + 2 kv_heads) dim], the input RMS-normalized
    out_proj: usize,               // panels [heads dim -> width], added to the residual stream
    fc: usize,                     // panels [width -> fc_width], input normalized, relu^2 after
    proj: usize,                   // panels [fc_width -> width], added to the residual stream
    value_embed: usize,            // 0, or a float32 table [vocab, kv_heads dim] added to the values
    lambdas: Option<(f32, f32)>,   // x0 mixing: the block's input is a x + b x0
}

/// A block as Python passes it: (qkv, out_proj, fc, proj, value_embed or 0, lambdas or None).
type BlockAddresses = (usize, usize, usize, usize, usize, Option<(f32, f32)>);

/// A whole decode step of nanochat/gpt.py's GPT in one call: embedding, every block, the head.
/// Why one call: at depth 4 a step is ~20 small products and 4 attentions of 10-60 us each; driving them
/// from Python cost ~0.4 ms of a ~1.2 ms batch-1 step in wrappers, checks and torch glue. Each product and
/// attention inside is the same exact kernel as decode_matmul / decode_attention, so rows stay batch-independent.
#[pyclass(frozen)]
pub struct DecodeModel {
    blocks: Vec<Block>,
    embedding: usize, // float32 [vocab, width]
    head: usize,      // panels [width -> vocab]
    vocab: usize,
    width: usize,
    fc_width: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    rotary: (usize, usize, usize), // cos, sin tables [table_len, dim] in GPT._decode_tables' form, table_len
    bf16: bool,
    softcap: f32, // logits = softcap * tanh(logits / softcap)
}

#[pymethods]
impl DecodeModel {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (blocks, embedding, head, vocab, width, fc_width, heads, kv_heads, dim, rotary, bf16, softcap))]
    fn new(blocks: Vec<BlockAddresses>, embedding: usize, head: usize,
           vocab: usize, width: usize, fc_width: usize, heads: usize, kv_heads: usize, dim: usize,
           rotary: (usize, usize, usize), bf16: bool, softcap: f32) -> PyResult<Self> {
        let blocks: Vec<Block> = blocks.into_iter()
            .map(|(qkv, out_proj, fc, proj, value_embed, lambdas)| Block { qkv, out_proj, fc, proj, value_embed, lambdas })
            .collect();
        let null_weight = blocks.iter().any(|b| [b.qkv, b.out_proj, b.fc, b.proj].contains(&0));
        if null_weight || [embedding, head, rotary.0, rotary.1].contains(&0) || kv_heads == 0 || !heads.is_multiple_of(kv_heads)
            || !dim.is_multiple_of(2) || heads * dim == 0 || width == 0 || softcap.is_nan() || softcap <= 0.0 {
            return Err(PyValueError::new_err("DecodeModel: a null weight or inconsistent head counts"));
        }
        Ok(DecodeModel { blocks, embedding, head, vocab, width, fc_width, heads, kv_heads, dim, rotary, bf16, softcap })
    }

    /// Row r: token tokens[r] at position positions[r] of slot slots[r] -> its soft-capped logits into
    /// `logits` [rows, vocab]. `cache`: float32 [blocks, 2, num_slots, kv_heads, capacity, dim], contiguous; each
    /// row's key and value are written at its position. Rows of one slot at consecutive positions (a prompt
    /// prefilled as a step) are causal: every key is written before any row attends.
    /// Products above `parallel_min_work` multiply-adds are split over `threads` threads.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (tokens, slots, positions, cache, num_slots, capacity, logits, threads, parallel_min_work))]
    fn step(&self, py: Python<'_>, tokens: Vec<usize>, slots: Vec<usize>, positions: Vec<usize>, cache: usize,
            num_slots: usize, capacity: usize, logits: usize, threads: usize, parallel_min_work: usize) -> PyResult<()> {
        let rows = tokens.len();
        if cache == 0 || logits == 0 || slots.len() != rows || positions.len() != rows {
            return Err(PyValueError::new_err("DecodeModel.step: null buffer, or tokens, slots and positions differ in length"));
        }
        if let Some(token) = tokens.iter().find(|&&t| t >= self.vocab) {
            return Err(PyValueError::new_err(format!("DecodeModel.step: token {token} is outside the vocabulary of {}", self.vocab)));
        }
        let table_len = self.rotary.2;
        if slots.iter().any(|&s| s >= num_slots) || positions.iter().any(|&p| p >= capacity || p >= table_len) {
            return Err(PyValueError::new_err(format!(
                "DecodeModel.step: a slot past {num_slots} or a position past the cache ({capacity}) or rotary table ({table_len})")));
        }
        let simd = vectorized();
        py.detach(|| unsafe {
            self.run(&tokens, &slots, &positions, cache as *mut f32, num_slots, capacity, logits as *mut f32, threads,
                     parallel_min_work, simd)
        });
        Ok(())
    }
}

impl DecodeModel {
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(&self, tokens: &[usize], slots: &[usize], positions: &[usize], cache: *mut f32, num_slots: usize,
                  capacity: usize, logits: *mut f32, threads: usize, parallel_min_work: usize, simd: bool) {
        let (rows, width, dim) = (tokens.len(), self.width, self.dim);
        let qkv_width = (self.heads + 2 * self.kv_heads) * dim;
        let value_start = (self.heads + self.kv_heads) * dim;
        let kv_width = self.kv_heads * dim;
        // products and attentions split over threads only when big enough to pay for waking them
        let threads_for = |work: usize| if work < parallel_min_work { 1 } else { threads };
        let product = |x: *const f32, k: usize, panels: usize, n: usize, out: *mut f32, residual: *const f32,
                       normalize: bool, relu_squared: bool| {
            let normalized = if normalize { rms_normalized(x, rows, k, simd) } else { Vec::new() };
            let x = if normalize { normalized.as_ptr() } else { x };
            let job = Matmul { x, rows, k, panels: panels as *const u8, bf16: self.bf16, n, out, residual, relu_squared };
            parallel_ranges(n.div_ceil(PANEL), threads_for(rows * k * n), |first, last| job.run(first, last, simd));
        };
        // x0 = the normalized token embedding; x, the residual stream, starts there
        let mut x0 = vec![0.0f32; rows * width];
        for (row, &token) in x0.chunks_exact_mut(width).zip(tokens) {
            row.copy_from_slice(std::slice::from_raw_parts((self.embedding as *const f32).add(token * width), width));
        }
        x0 = rms_normalized(x0.as_ptr(), rows, width, simd);
        let mut x = x0.clone();
        let mut qkv_buffer = vec![0.0f32; rows * qkv_width];
        let qkv = qkv_buffer.as_mut_ptr(); // written by the qkv product, read by attention
        let mut attended = vec![0.0f32; rows * self.heads * dim];
        let mut hidden = vec![0.0f32; rows * self.fc_width];
        let mut queries = vec![0.0f32; rows * self.heads * dim];
        let layer_floats = 2 * num_slots * self.kv_heads * capacity * dim;
        let (cos, sin, _) = self.rotary;
        let attention_rows = Rows { qkv, stride: qkv_width, rotary: Some((cos as *const f32, sin as *const f32)),
                                    slots, positions };
        let attention_work = 2 * self.heads * dim * (positions.iter().sum::<usize>() + rows);
        for (layer, block) in self.blocks.iter().enumerate() {
            if let Some((a, b)) = block.lambdas {
                // two products and a sum, each rounded, as torch computes a * x + b * x0
                x.iter_mut().zip(&x0).for_each(|(v, &v0)| *v = a * *v + b * v0);
            }
            product(x.as_ptr(), width, block.qkv, qkv_width, qkv, std::ptr::null(), true, false);
            if block.value_embed != 0 {
                for (row, &token) in tokens.iter().enumerate() {
                    let values = std::slice::from_raw_parts_mut(qkv.add(row * qkv_width + value_start), kv_width);
                    let table = std::slice::from_raw_parts((block.value_embed as *const f32).add(token * kv_width), kv_width);
                    values.iter_mut().zip(table).for_each(|(v, &e)| *v += e);
                }
            }
            let attention = Attention { q: std::ptr::null(), q_stride: self.heads * dim, out: attended.as_mut_ptr(),
                                        keys: cache.add(layer * layer_floats), value_offset: layer_floats / 2, capacity,
                                        heads: self.heads, kv_heads: self.kv_heads, dim };
            attention.prepare(&attention_rows, &mut queries, simd);
            let attention = Attention { q: queries.as_ptr(), ..attention };
            parallel_ranges(rows * self.heads, threads_for(attention_work), |first, last| {
                attention.heads_range(first, last, slots, positions, simd)
            });
            // the residual adds write x in place: each output reads only its own residual element first
            product(attended.as_ptr(), self.heads * dim, block.out_proj, width, x.as_mut_ptr(), x.as_ptr(), false, false);
            product(x.as_ptr(), width, block.fc, self.fc_width, hidden.as_mut_ptr(), std::ptr::null(), true, true);
            product(hidden.as_ptr(), self.fc_width, block.proj, width, x.as_mut_ptr(), x.as_ptr(), false, false);
        }
        product(x.as_ptr(), width, self.head, self.vocab, logits, std::ptr::null(), true, false);
        soft_cap(std::slice::from_raw_parts_mut(logits, rows * self.vocab), self.softcap, simd);
    }
}

/// values = cap * tanh(values / cap), the logit softcap of nanochat/gpt.py. torch's tanh runs at ~4 ns a value
/// here (~0.2 ms of an 8-row step at vocab 8192); this one is a few vector instructions per 8 values.
fn soft_cap(values: &mut [f32], cap: f32, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return unsafe { soft_cap_avx2(values, cap) };
    }
    let _ = simd;
    values.iter_mut().for_each(|v| *v = cap * tanh(*v / cap));
}

// the same loop compiled with AVX2 + FMA: vectorized, each lane the same operations (no reassociation), same bits
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn soft_cap_avx2(values: &mut [f32], cap: f32) {
    values.iter_mut().for_each(|v| *v = cap * tanh(*v / cap));
}

/// tanh(x) = sign(x) (1 - 2 / (e^(2|x|) + 1)), with e^a as 2^n e^r (n = round(a / ln 2), |r| <= ln 2 / 2) and
/// e^r from Cephes' expf polynomial: within ~2e-7 of tanh (absolute), plain arithmetic that vectorizes.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let a = (2.0 * x.abs()).min(88.0); // e^88 still fits a float32; tanh(44) is 1 to float32 precision anyway
    let n = (a * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (-n).mul_add(0.693_359_4, a); // ln 2 in two parts (Cody-Waite): r stays exact to float32 precision
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let exp_r = (p * r).mul_add(r, r) + 1.0;
    let exp_a = exp_r * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x.is_nan() { x } else { (1.0 - 2.0 / (exp_a + 1.0)).copysign(x) }
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
    fn soft_cap_is_tanh_and_the_same_bits_in_both_paths() {
        let values: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 40.0).collect(); // -50 .. 50
        let mut plain = values.clone();
        soft_cap(&mut plain, 15.0, false);
        for (&v, &capped) in values.iter().zip(&plain) {
            let expected = 15.0 * (v as f64 / 15.0).tanh();
            assert!((capped as f64 - expected).abs() < 4e-6, "softcap({v}) = {capped}, expected {expected}");
        }
        let mut nan = [f32::NAN];
        soft_cap(&mut nan, 15.0, false);
        assert!(nan[0].is_nan());
        let mut fast = values.clone();
        soft_cap(&mut fast, 15.0, vectorized());
        assert_eq!(fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn four_dot_products_at_once_are_each_the_single_one() {
        for len in [5, 37, 64, 128] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 337.0).collect();
            let bs: Vec<Vec<f32>> = (0..4).map(|j| (0..len).map(|i| ((i * 104729 + j * 31) % 997) as f32 / 211.0 - 2.3).collect()).collect();
            let four = [&bs[0][..], &bs[1][..], &bs[2][..], &bs[3][..]];
            let single: Vec<u32> = four.iter().map(|b| dot(&a, b).to_bits()).collect();
            #[cfg(target_arch = "x86_64")]
            if vectorized() {
                assert_eq!(unsafe { dots4_avx2(&a, four) }.map(f32::to_bits)[..], single[..], "AVX2, length {len}");
            }
        }
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
