//! Dot products in a fixed order, and the RMSNorm built on them.
//!
//! A float sum depends on its order. Here a dot product always runs in DOT_LANES lanes of fused multiply-adds
//! (lane l takes elements l, l + 8, l + 16, ...), then adds the lanes in one fixed pairwise order. Compiled
//! with AVX2 the lane loop is one vector multiply-add per 8 elements; without it, 8 scalar ones: the same
//! roundings either way, so the scalar fallback and the vector path give the same bits.

/// Lanes of the partial sums of a dot product (one AVX2 register); fixed so every path sums alike.
pub const DOT_LANES: usize = 8;

/// a . b in DOT_LANES fixed lanes of fused multiply-adds, summed in a fixed pairwise order (inlined into
/// the AVX2-compiled callers, the lane loop is one vector FMA)
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub fn sum_lanes(lanes: &[f32; DOT_LANES], a: &[f32], b: &[f32], whole: usize) -> f32 {
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])) + tail
}

/// Scale `row` to unit root-mean-square in place (parameter-free RMSNorm, eps = float32 epsilon as in nanochat/gpt.py).
#[inline(always)]
pub fn normalize(row: &mut [f32]) {
    let scale = 1.0 / (dot(row, row) / row.len() as f32 + f32::EPSILON).sqrt();
    row.iter_mut().for_each(|v| *v *= scale);
}

/// A copy of `rows` (rows of `width` floats), each row normalized.
pub fn rms_normalized(rows: &[f32], width: usize, simd: bool) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is only true where crate::vectorized() found AVX2 and FMA
        return unsafe { rms_normalized_avx2(rows, width) };
    }
    let _ = simd;
    rms_normalized_plain(rows, width)
}

// the same code compiled with AVX2 + FMA: the lane loop of `dot` becomes one vector multiply-add
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_normalized_avx2(rows: &[f32], width: usize) -> Vec<f32> {
    rms_normalized_plain(rows, width)
}

#[inline(always)]
fn rms_normalized_plain(rows: &[f32], width: usize) -> Vec<f32> {
    let mut normalized = rows.to_vec();
    normalized.chunks_exact_mut(width).for_each(normalize);
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normalized_row_has_unit_rms_and_the_same_bits_in_both_paths() {
        let width = 37; // not a multiple of the lanes: the tail is summed too
        let rows: Vec<f32> = (0..3 * width).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
        let plain = rms_normalized(&rows, width, false);
        for row in plain.chunks_exact(width) {
            let mean_square: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            assert!((mean_square - 1.0).abs() < 1e-5, "rms^2 = {mean_square}");
        }
        assert_eq!(rms_normalized(&rows, width, crate::vectorized()), plain);
    }
}
