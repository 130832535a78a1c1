//! One layer's attention for rows at their own positions, over the caller's KV cache.
//!
//! Two phases, so a prompt fed as one step (rows of one slot at consecutive positions) is causal by
//! construction: first every row's key and value are written at its position (after the rotary angle and
//! QK-norm of nanochat/gpt.py), then every row attends over positions 0..=its own of its slot. Scores are
//! the fixed-order dot products of norm.rs, 4 keys at a time in AVX2; a row's result never depends on the
//! other rows or on which thread ran which of its heads.

use crate::norm::{dot, normalize, sum_lanes, DOT_LANES};

/// One layer of a step: each row's query heads, the output, and the layer's part of the cache.
#[derive(Clone, Copy)]
pub struct Attention {
    pub q: *const f32, // row r's query heads, ready to use: [heads, dim] at r * q_stride
    pub q_stride: usize,
    pub out: *mut f32,  // [rows, heads, dim]
    pub keys: *mut f32, // this layer's keys: [slots, kv_heads, capacity, dim]; values follow at +value_offset
    pub value_offset: usize,
    pub capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}
// SAFETY: the threads of one attention read the cache and queries and write disjoint heads of `out`
unsafe impl Send for Attention {}
unsafe impl Sync for Attention {}

/// A step's inputs to one layer's attention: row r's q|k|v heads side by side at qkv + r * stride (a row of
/// the qkv product), the rotary tables of gpt.py ([positions, dim / 2]), and where each row goes.
pub struct Qkv<'a> {
    pub qkv: *const f32,
    pub stride: usize,
    pub cos: *const f32,
    pub sin: *const f32,
    pub slots: &'a [usize],
    pub positions: &'a [usize],
}

impl Attention {
    fn kv_at(&self, slot: usize, kv_head: usize, position: usize) -> usize {
        ((slot * self.kv_heads + kv_head) * self.capacity + position) * self.dim
    }

    /// Per row: its query heads (rotated, normed) into `queries`, its key (rotated, normed) and value into the cache.
    /// SAFETY (this and every method below): the pointers hold the sizes above, every slot and position is
    /// inside the cache and the rotary tables; `simd` only where crate::vectorized().
    pub unsafe fn prepare(&self, rows: &Qkv, queries: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.prepare_avx2(rows, queries);
        }
        let _ = simd;
        self.prepare_plain(rows, queries)
    }

    // the same code compiled with AVX2 + FMA: the lane loops become vector instructions, each lane the same FMA
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prepare_avx2(&self, rows: &Qkv, queries: &mut [f32]) {
        self.prepare_plain(rows, queries)
    }

    #[inline(always)]
    unsafe fn prepare_plain(&self, rows: &Qkv, queries: &mut [f32]) {
        let (dim, half) = (self.dim, self.dim / 2);
        for (row, (&slot, &position)) in rows.slots.iter().zip(rows.positions).enumerate() {
            let source = rows.qkv.add(row * rows.stride);
            let head_of = |h: usize| std::slice::from_raw_parts(source.add(h * dim), dim);
            let cos = std::slice::from_raw_parts(rows.cos.add(position * half), half);
            let sin = std::slice::from_raw_parts(rows.sin.add(position * half), half);
            for h in 0..self.heads {
                rotate_and_normalize(head_of(h), cos, sin, &mut queries[(row * self.heads + h) * dim..][..dim]);
            }
            for h in 0..self.kv_heads {
                let at = self.kv_at(slot, h, position);
                rotate_and_normalize(head_of(self.heads + h), cos, sin, std::slice::from_raw_parts_mut(self.keys.add(at), dim));
                let value = head_of(self.heads + self.kv_heads + h);
                std::slice::from_raw_parts_mut(self.keys.add(self.value_offset + at), dim).copy_from_slice(value);
            }
        }
    }

    /// Items first..last of rows x heads (item = row * heads + head): each head's attention into `out`.
    pub unsafe fn heads_range(&self, first: usize, last: usize, slots: &[usize], positions: &[usize], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.heads_range_avx2(first, last, slots, positions);
        }
        let _ = simd;
        self.heads_range_plain::<false>(first, last, slots, positions)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_range_avx2(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        self.heads_range_plain::<true>(first, last, slots, positions)
    }

    #[inline(always)]
    unsafe fn heads_range_plain<const SIMD: bool>(&self, first: usize, last: usize, slots: &[usize], positions: &[usize]) {
        let mut scores = Vec::with_capacity(positions.iter().max().map_or(1, |p| p + 1));
        for item in first..last {
            let (row, head) = (item / self.heads, item % self.heads);
            self.head::<SIMD>(row, head, slots[row], positions[row], &mut scores);
        }
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
}

/// The rotary angle and QK-norm of nanochat/gpt.py for one head: its halves (x1, x2) turn into
/// (x1 cos + x2 sin, x2 cos - x1 sin), each one fused multiply-add, then the head is RMS-normalized.
#[inline(always)]
fn rotate_and_normalize(x: &[f32], cos: &[f32], sin: &[f32], dst: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = dst.split_at_mut(half);
    for i in 0..half {
        y1[i] = x2[i].mul_add(sin[i], x1[i] * cos[i]);
        y2[i] = (-x1[i]).mul_add(sin[i], x2[i] * cos[i]);
    }
    normalize(dst);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_dot_products_at_once_are_each_the_single_one() {
        for len in [5, 37, 64, 128] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 337.0).collect();
            let bs: Vec<Vec<f32>> = (0..4).map(|j| (0..len).map(|i| ((i * 104729 + j * 31) % 997) as f32 / 211.0 - 2.3).collect()).collect();
            let four = [&bs[0][..], &bs[1][..], &bs[2][..], &bs[3][..]];
            let single: Vec<u32> = four.iter().map(|b| dot(&a, b).to_bits()).collect();
            #[cfg(target_arch = "x86_64")]
            if crate::vectorized() {
                assert_eq!(unsafe { dots4_avx2(&a, four) }.map(f32::to_bits)[..], single[..], "AVX2, length {len}");
            }
        }
    }

    #[test]
    fn rotation_turns_each_pair_by_its_angle_and_keeps_the_norm() {
        let (cos, sin) = ([0.6f32, 1.0], [0.8f32, 0.0]); // pair 0 turned by atan2(0.8, 0.6), pair 1 not at all
        let mut rotated = [0.0f32; 4];
        rotate_and_normalize(&[1.0, 2.0, 0.0, 3.0], &cos, &sin, &mut rotated);
        let rms = (14.0f32 / 4.0).sqrt(); // a rotation keeps the rms: QK-norm divides by the input's
        let expected = [0.6 / rms, 2.0 / rms, -0.8 / rms, 3.0 / rms];
        for (got, want) in rotated.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{rotated:?} vs {expected:?}");
        }
    }
}
