//! A whole decode step of nanochat/gpt.py's GPT: the embedding, every block, the head, the softcap.
//!
//! The same maths as GPT.decode_step's torch loop, in the same order: x0 = norm(embedding), then per block
//! [x = a x + b x0,] qkv = norm(x) W_qkv [+ value embedding on v], attention, x += y W_o,
//! x += relu(norm(x) W_fc)^2 W_proj; logits = softcap(norm(x) W_head). Each product is matmul.rs's, each
//! attention attention.rs's, so every row's numbers are the same whatever rows share its step.

use crate::attention::{Attention, Qkv};
use crate::matmul::{parallel_ranges, Matmul, PANEL};
use crate::norm::rms_normalized;

/// The model's sizes; every buffer is checked against them before a Model points into it (lib.rs).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub vocab: usize,
    pub width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,        // per head
    pub fc_width: usize,   // the MLP's hidden width
    pub rotary_len: usize, // positions in the rotary tables
}

/// One block's weights: panels (matmul.rs) of the transposed nn.Linear weights, and the optional extras.
pub struct Block {
    pub qkv: *const u8,      // [width -> (heads + 2 kv_heads) dim], the input RMS-normalized
    pub out_proj: *const u8, // [heads dim -> width], added to the residual stream
    pub fc: *const u8,       // [width -> fc_width], input normalized, relu^2 after
    pub proj: *const u8,     // [fc_width -> width], added to the residual stream
    pub value_embed: Option<*const f32>, // a float32 table [vocab, kv_heads dim] added to the values
    pub lambdas: Option<(f32, f32)>,     // x0 mixing: the block's input is a x + b x0
}

/// Addresses of the weights and their sizes; lib.rs's DecodeModel holds the buffers behind them.
pub struct Model {
    pub sizes: Sizes,
    pub embedding: *const f32, // [vocab, width]
    pub blocks: Vec<Block>,
    pub head: *const u8,       // panels [width -> vocab]
    pub cos: *const f32,       // [rotary_len, dim / 2]
    pub sin: *const f32,
    pub bf16: bool,            // the panels hold bfloat16, else float32
    pub softcap: f32,          // logits = softcap * tanh(logits / softcap)
}
// SAFETY: a step only reads the weights, and their buffers live as long as the model (lib.rs)
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// The rows of one step: row r feeds tokens[r] at positions[r] of cache slot slots[r].
pub struct Rows<'a> {
    pub tokens: &'a [usize],
    pub slots: &'a [usize],
    pub positions: &'a [usize],
}

/// The caller's KV cache: float32 [layers, 2, slots, kv_heads, capacity, dim], contiguous.
pub struct Cache<'a> {
    pub data: &'a mut [f32],
    pub slots: usize,
    pub capacity: usize,
}

/// How a step may use threads: products and attentions of fewer multiply-adds than `min_work` run on the
/// calling thread alone (waking a pool thread costs tens of microseconds), bigger ones on `count` threads.
#[derive(Clone, Copy)]
pub struct Threads {
    pub count: usize,
    pub min_work: usize,
}

impl Threads {
    fn for_work(&self, work: usize) -> usize {
        if work < self.min_work { 1 } else { self.count }
    }
}

impl Model {
    /// Row r's soft-capped logits into logits[r * vocab..][..vocab]; row r's key and value written into the
    /// cache at its position. Every key is written before any row attends (attention.rs), so rows of one slot
    /// at consecutive positions (a prompt prefilled as a step) are causal.
    /// SAFETY: the weights hold `sizes`; every token < vocab, slot < cache.slots, position < cache.capacity and
    /// < rotary_len; the cache holds layers x 2 x slots x kv_heads x capacity x dim floats and logits rows x
    /// vocab (lib.rs checks all); `simd` only where crate::vectorized().
    pub unsafe fn step(&self, rows: &Rows, cache: Cache, logits: &mut [f32], threads: Threads, simd: bool) {
        let cache_start = cache.data.as_mut_ptr();
        let Sizes { width, heads, kv_heads, dim, fc_width, vocab, .. } = self.sizes;
        let count = rows.tokens.len();
        let qkv_width = (heads + 2 * kv_heads) * dim;
        let product = |x: &[f32], k: usize, panels: *const u8, n: usize, out: *mut f32, residual: *const f32,
                       normalize: bool, relu_squared: bool| {
            let normalized = if normalize { rms_normalized(x, k, simd) } else { Vec::new() };
            let x = if normalize { normalized.as_ptr() } else { x.as_ptr() };
            let job = Matmul { x, rows: count, k, panels, bf16: self.bf16, n, out, residual, relu_squared };
            parallel_ranges(n.div_ceil(PANEL), threads.for_work(count * k * n), |first, last| job.run(first, last, simd));
        };
        // x0 = the normalized token embedding; x, the residual stream, starts there
        let x0 = rms_normalized(&self.embedded(rows.tokens), width, simd);
        let mut x = x0.clone();
        let mut qkv = vec![0.0f32; count * qkv_width];
        let mut attended = vec![0.0f32; count * heads * dim];
        let mut hidden = vec![0.0f32; count * fc_width];
        let mut queries = vec![0.0f32; count * heads * dim];
        let layer_floats = 2 * cache.slots * kv_heads * cache.capacity * dim;
        let attention_work = 2 * heads * dim * (rows.positions.iter().sum::<usize>() + count);
        for (layer, block) in self.blocks.iter().enumerate() {
            if let Some((a, b)) = block.lambdas {
                // two products and a sum, each rounded, as torch computes a * x + b * x0
                x.iter_mut().zip(&x0).for_each(|(v, &v0)| *v = a * *v + b * v0);
            }
            product(&x, width, block.qkv, qkv_width, qkv.as_mut_ptr(), std::ptr::null(), true, false);
            if let Some(table) = block.value_embed {
                self.add_value_embedding(&mut qkv, table, rows.tokens);
            }
            let attention = Attention { q: std::ptr::null(), q_stride: heads * dim, out: attended.as_mut_ptr(),
                                        keys: cache_start.add(layer * layer_floats), value_offset: layer_floats / 2,
                                        capacity: cache.capacity, heads, kv_heads, dim };
            let inputs = Qkv { qkv: qkv.as_ptr(), stride: qkv_width, cos: self.cos, sin: self.sin, slots: rows.slots,
                               positions: rows.positions };
            attention.prepare(&inputs, &mut queries, simd);
            let attention = Attention { q: queries.as_ptr(), ..attention };
            parallel_ranges(count * heads, threads.for_work(attention_work), |first, last| {
                attention.heads_range(first, last, rows.slots, rows.positions, simd)
            });
            // the residual adds write x in place: each output reads only its own residual element first
            let residual = x.as_mut_ptr();
            product(&attended, heads * dim, block.out_proj, width, residual, residual, false, false);
            product(&x, width, block.fc, fc_width, hidden.as_mut_ptr(), std::ptr::null(), true, true);
            let residual = x.as_mut_ptr();
            product(&hidden, fc_width, block.proj, width, residual, residual, false, false);
        }
        product(&x, width, self.head, vocab, logits.as_mut_ptr(), std::ptr::null(), true, false);
        soft_cap(logits, self.softcap, simd);
    }

    /// The embedding rows of `tokens`, [rows, width].
    unsafe fn embedded(&self, tokens: &[usize]) -> Vec<f32> {
        let width = self.sizes.width;
        let mut rows = vec![0.0f32; tokens.len() * width];
        for (row, &token) in rows.chunks_exact_mut(width).zip(tokens) {
            row.copy_from_slice(std::slice::from_raw_parts(self.embedding.add(token * width), width));
        }
        rows
    }

    /// Each row's value heads (the last kv_heads dim of its qkv row) += its token's row of `table`.
    unsafe fn add_value_embedding(&self, qkv: &mut [f32], table: *const f32, tokens: &[usize]) {
        let Sizes { heads, kv_heads, dim, .. } = self.sizes;
        let (kv_width, value_start) = (kv_heads * dim, (heads + kv_heads) * dim);
        for (row, &token) in qkv.chunks_exact_mut((heads + 2 * kv_heads) * dim).zip(tokens) {
            let embedding = std::slice::from_raw_parts(table.add(token * kv_width), kv_width);
            row[value_start..].iter_mut().zip(embedding).for_each(|(v, &e)| *v += e);
        }
    }
}

/// values = cap * tanh(values / cap), the logit softcap of nanochat/gpt.py. torch's tanh runs at ~4 ns a value
/// here (~0.2 ms of an 8-row step at vocab 8192); this one is a few vector instructions per 8 values.
pub fn soft_cap(values: &mut [f32], cap: f32, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is only true where crate::vectorized() found AVX2 and FMA
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::pack;
    use crate::matmul::widen_bf16;
    use crate::vectorized;

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
        assert_eq!(bits(&fast), bits(&plain));
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Deterministic values in about [-scale, scale].
    fn numbers(count: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..count).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0).map(|v| v * scale).collect()
    }

    /// A small model in Rust memory: odd sizes (partial panels, a head dim with a lane tail), GQA, x0 mixing and
    /// a value embedding on the last block, its panels float32 or bfloat16.
    enum Panels {
        Float(Vec<f32>),
        Bf16(Vec<u16>),
    }

    impl Panels {
        fn address(&self) -> *const u8 {
            match self {
                Panels::Float(panels) => panels.as_ptr() as *const u8,
                Panels::Bf16(panels) => panels.as_ptr() as *const u8,
            }
        }
    }

    struct TinyModel {
        sizes: Sizes,
        embedding: Vec<f32>,
        panels: Vec<Panels>, // qkv, out_proj, fc, proj per block, then the head
        value_embed: Vec<f32>,
        cos: Vec<f32>,
        sin: Vec<f32>,
        bf16: bool,
    }

    impl TinyModel {
        const BLOCKS: usize = 2;

        fn new(bf16: bool, round_to_bf16: bool) -> Self {
            let sizes = Sizes { vocab: 45, width: 24, heads: 2, kv_heads: 1, dim: 12, fc_width: 40, rotary_len: 20 };
            let Sizes { vocab, width, heads, kv_heads, dim, fc_width, rotary_len } = sizes;
            let shapes = [(width, (heads + 2 * kv_heads) * dim), (heads * dim, width), (width, fc_width), (fc_width, width)];
            let mut shapes: Vec<(usize, usize)> = (0..Self::BLOCKS).flat_map(|_| shapes).collect();
            shapes.push((width, vocab));
            let bf16_bits = |w: f32| (w.to_bits() >> 16) as u16; // truncation: any bf16 values will do here
            let panels = shapes.iter().enumerate().map(|(i, &(k, n))| {
                let weights = numbers(k * n, i, 1.0 / (k as f32).sqrt());
                if bf16 {
                    Panels::Bf16(pack(&weights.iter().map(|&w| bf16_bits(w)).collect::<Vec<_>>(), k, n))
                } else if round_to_bf16 {
                    Panels::Float(pack(&weights.iter().map(|&w| widen_bf16(bf16_bits(w))).collect::<Vec<_>>(), k, n))
                } else {
                    Panels::Float(pack(&weights, k, n))
                }
            }).collect();
            let angles = numbers(rotary_len * dim / 2, 99, 3.0);
            TinyModel { sizes, embedding: numbers(vocab * width, 7, 1.0), panels, value_embed: numbers(vocab * kv_heads * dim, 8, 0.5),
                        cos: angles.iter().map(|a| a.cos()).collect(), sin: angles.iter().map(|a| a.sin()).collect(), bf16 }
        }

        fn model(&self) -> Model {
            let blocks = (0..Self::BLOCKS).map(|b| {
                let panel = |i: usize| self.panels[4 * b + i].address();
                let last = b == Self::BLOCKS - 1;
                Block { qkv: panel(0), out_proj: panel(1), fc: panel(2), proj: panel(3),
                        value_embed: last.then_some(self.value_embed.as_ptr()), lambdas: Some((0.9 + b as f32 * 0.3, 0.4)) }
            }).collect();
            Model { sizes: self.sizes, embedding: self.embedding.as_ptr(), blocks, head: self.panels.last().unwrap().address(),
                    cos: self.cos.as_ptr(), sin: self.sin.as_ptr(), bf16: self.bf16, softcap: 15.0 }
        }

        /// A step of `rows` (token, slot, position) over `cache`: (logits, the cache after).
        fn step(&self, rows: &[(usize, usize, usize)], cache: &[f32], threads: usize, simd: bool) -> (Vec<f32>, Vec<f32>) {
            let column = |f: fn(&(usize, usize, usize)) -> usize| rows.iter().map(f).collect::<Vec<_>>();
            let (tokens, slots, positions) = (column(|r| r.0), column(|r| r.1), column(|r| r.2));
            let mut cache = cache.to_vec();
            let mut logits = vec![0.0; rows.len() * self.sizes.vocab];
            let model = self.model();
            let rows = Rows { tokens: &tokens, slots: &slots, positions: &positions };
            let cache_view = Cache { data: &mut cache, slots: SLOTS, capacity: CAPACITY };
            // min_work 0: every product and attention is split, however small
            unsafe { model.step(&rows, cache_view, &mut logits, Threads { count: threads, min_work: 0 }, simd) };
            (logits, cache)
        }
    }

    const CAPACITY: usize = 16;
    const SLOTS: usize = 8;

    fn full_cache(sizes: &Sizes) -> Vec<f32> {
        numbers(TinyModel::BLOCKS * 2 * SLOTS * sizes.kv_heads * CAPACITY * sizes.dim, 5, 1.0)
    }

    #[test]
    fn a_rows_logits_and_cache_writes_are_the_same_bits_in_any_batch_thread_count_or_path() {
        let tiny = TinyModel::new(false, false);
        let cache = full_cache(&tiny.sizes);
        // (token, slot, position): rows at their own positions, 3 of them attending over 4k + a tail of keys
        let rows = [(3, 0, 0), (44, 1, 15), (7, 2, 3), (0, 3, 9), (12, 4, 4), (30, 5, 12), (3, 6, 7), (19, 7, 1)];
        let (all_logits, all_cache) = tiny.step(&rows, &cache, 1, false);
        assert!(all_logits.iter().all(|v| v.is_finite() && v.abs() < 15.0));
        let vocab = tiny.sizes.vocab;
        for threads in [1, 2, 3] {
            for simd in [false, vectorized()] {
                let (logits, after) = tiny.step(&rows, &cache, threads, simd);
                assert_eq!(bits(&logits), bits(&all_logits), "threads {threads} simd {simd}");
                assert_eq!(bits(&after), bits(&all_cache), "threads {threads} simd {simd}");
                for (r, &row) in rows.iter().enumerate() {
                    let (alone, _) = tiny.step(&[row], &cache, threads, simd);
                    assert_eq!(bits(&alone), bits(&all_logits[r * vocab..][..vocab]), "row {r} threads {threads} simd {simd}");
                }
                let reversed: Vec<_> = rows.iter().rev().copied().collect();
                let (logits, _) = tiny.step(&reversed, &cache, threads, simd);
                for r in 0..rows.len() {
                    assert_eq!(bits(&logits[(rows.len() - 1 - r) * vocab..][..vocab]), bits(&all_logits[r * vocab..][..vocab]));
                }
            }
        }
    }

    #[test]
    fn a_prompt_as_one_step_is_its_tokens_one_step_at_a_time() {
        let tiny = TinyModel::new(false, false);
        let prompt = [(5, 2, 0), (17, 2, 1), (40, 2, 2), (5, 2, 3), (9, 2, 4)];
        let (logits, after) = tiny.step(&prompt, &full_cache(&tiny.sizes), 2, vectorized());
        let mut cache = full_cache(&tiny.sizes);
        let vocab = tiny.sizes.vocab;
        for (r, &row) in prompt.iter().enumerate() {
            let (one, next) = tiny.step(&[row], &cache, 1, false);
            assert_eq!(bits(&one), bits(&logits[r * vocab..][..vocab]), "prompt token {r}");
            cache = next;
        }
        assert_eq!(bits(&cache), bits(&after));
    }

    #[test]
    fn bfloat16_panels_are_float32_panels_of_the_rounded_weights() {
        let (bf16, rounded) = (TinyModel::new(true, false), TinyModel::new(false, true));
        let rows = [(3, 0, 0), (44, 1, 15), (7, 2, 3)];
        let cache = full_cache(&bf16.sizes);
        for simd in [false, vectorized()] {
            let (bf16_logits, bf16_cache) = bf16.step(&rows, &cache, 2, simd);
            let (rounded_logits, rounded_cache) = rounded.step(&rows, &cache, 1, false);
            assert_eq!(bits(&bf16_logits), bits(&rounded_logits), "simd {simd}");
            assert_eq!(bits(&bf16_cache), bits(&rounded_cache), "simd {simd}");
        }
    }
}
