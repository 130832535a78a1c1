//! decode_kernels: a whole decode step of nanochat's GPT on CPU in one call, batch-invariant, for the chat
//! server's continuous batching (nanochat/cpu_decode.py drives it).
//!
//! Why not torch.mm and scaled_dot_product_attention:
//!
//! 1. Exactness. A greedy reply must be the same text whether its request is alone or shares each step
//!    with seven others. BLAS picks its kernel and its thread split by the number of rows, so the same row
//!    comes out with different rounding in a batch of 1, 3 or 8 (MKL: M = 1..3 use another kernel, M = 5..7
//!    split rows unevenly), and a near-tie in the logits then flips. Here every output number is one fixed
//!    chain of fused multiply-adds: the same chain for any number of rows, any thread split, and in the
//!    AVX2 path and the scalar fallback alike (a fused multiply-add rounds once, in a vector lane or not).
//! 2. Speed. A decode step multiplies a handful of rows by every weight matrix: it should cost about one
//!    read of the weights, whatever the row count (matmul.rs). MKL's small-M sgemm on a 2-core AMD EPYC runs
//!    at ~20 GFLOP/s, so 8 rows cost ~3x one row.
//! 3. One call. At depth 4 a step is ~20 small products and 4 attentions of 10-60 us each; driving them from
//!    Python cost ~0.4 ms of a ~1.2 ms batch-1 step in wrappers, checks and torch glue (step.rs walks the model).
//!
//! This file is the Python face. Weights, the KV cache and the logits arrive as Python buffers (numpy arrays
//! over torch tensors' memory), never as raw addresses: each is checked here for its item type, C-contiguity,
//! writability where the step writes, and its shape against the model's sizes; every token, slot and position
//! against the vocabulary, the cache and the rotary table. The kernels then read and write raw memory that
//! is known to be there. A DecodeModel keeps its weights' buffers open, so their memory lives as long as it.

mod attention;
mod matmul;
mod norm;
mod step;

use std::ops::Range;

use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use matmul::PANEL;
use step::{Block, Cache, Model, Rows, Sizes, Threads};

/// Whether this CPU runs the AVX2 + FMA paths (else the scalar ones: the same results, slower).
pub(crate) fn vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn value_error(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// `object`'s buffer of `T` items, C-contiguous, else a ValueError naming it (`item`: T in words).
fn contiguous_buffer<T: Element>(object: &Bound<'_, PyAny>, name: &str, item: &str) -> PyResult<PyBuffer<T>> {
    let buffer = PyBuffer::<T>::get(object)
        .map_err(|error| value_error(format!("{name} must be a buffer of {item} (a numpy array): {error}")))?;
    if !buffer.is_c_contiguous() {
        return Err(value_error(format!("{name} must be C-contiguous (a .contiguous() tensor)")));
    }
    Ok(buffer)
}

fn check_shape<T>(buffer: &PyBuffer<T>, name: &str, shape: &[usize]) -> PyResult<()> {
    if buffer.shape() != shape {
        return Err(value_error(format!("{name} has shape {:?}, this model's is {shape:?}", buffer.shape())));
    }
    Ok(())
}

/// A float32 buffer the step writes into.
fn writable_buffer(object: &Bound<'_, PyAny>, name: &str) -> PyResult<PyBuffer<f32>> {
    let buffer = contiguous_buffer::<f32>(object, name, "float32")?;
    if buffer.readonly() {
        return Err(value_error(format!("{name} is read-only: the step writes into it")));
    }
    Ok(buffer)
}

fn bytes_of<T>(buffer: &PyBuffer<T>) -> Range<usize> {
    let start = buffer.buf_ptr() as usize;
    start..start + buffer.len_bytes()
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// Each value as an index below `bound`, or a ValueError from `refusal(value)`.
fn indices(values: Vec<i64>, bound: usize, refusal: impl Fn(i64) -> String) -> PyResult<Vec<usize>> {
    values.into_iter()
        .map(|v| usize::try_from(v).ok().filter(|&i| i < bound).ok_or_else(|| value_error(refusal(v))))
        .collect()
}

/// A buffer a DecodeModel reads, held open as long as the model: its exporter (a numpy array, and through it the
/// torch tensor that owns the memory) stays alive, so the memory under the model's addresses is never freed.
enum Held {
    Float(PyBuffer<f32>),
    Bf16(PyBuffer<u16>),
}

impl Held {
    fn bytes(&self) -> Range<usize> {
        match self {
            Held::Float(buffer) => bytes_of(buffer),
            Held::Bf16(buffer) => bytes_of(buffer),
        }
    }
}

/// Checks a model's buffers one by one against their expected shapes and holds them.
struct Weights {
    held: Vec<Held>,
    bf16: bool, // panels hold bfloat16 bits (uint16), else float32
}

impl Weights {
    /// A float32 table of exactly `shape`.
    fn table(&mut self, object: &Bound<'_, PyAny>, name: &str, shape: &[usize]) -> PyResult<*const f32> {
        let buffer = contiguous_buffer::<f32>(object, name, "float32")?;
        check_shape(&buffer, name, shape)?;
        let start = buffer.buf_ptr() as *const f32;
        self.held.push(Held::Float(buffer));
        Ok(start)
    }

    /// gpt.py's rotary tables cos and sin, float32 [positions, half] each, and the positions they cover.
    fn rotary(&mut self, cos: &Bound<'_, PyAny>, sin: &Bound<'_, PyAny>, half: usize) -> PyResult<(*const f32, *const f32, usize)> {
        let positions = contiguous_buffer::<f32>(cos, "cos", "float32")?.shape().first().copied().unwrap_or(0);
        Ok((self.table(cos, "cos", &[positions, half])?, self.table(sin, "sin", &[positions, half])?, positions))
    }

    /// Panels [ceil(n / 16), k, 16] of a [k -> n] product (nanochat/cpu_decode.py's pack_panels).
    fn panels(&mut self, object: &Bound<'_, PyAny>, name: &str, k: usize, n: usize) -> PyResult<*const u8> {
        let shape = [n.div_ceil(PANEL), k, PANEL];
        if !self.bf16 {
            return Ok(self.table(object, name, &shape)? as *const u8);
        }
        let buffer = contiguous_buffer::<u16>(object, name, "bfloat16 bits (uint16)")?;
        check_shape(&buffer, name, &shape)?;
        let start = buffer.buf_ptr() as *const u8;
        self.held.push(Held::Bf16(buffer));
        Ok(start)
    }
}

/// A block as Python passes it: panels of qkv, out_proj, fc, proj; its value embedding table or None; its
/// x0-mixing lambdas (a, b) or None.
type BlockBuffers<'py> =
    (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Option<Bound<'py, PyAny>>, Option<(f32, f32)>);

/// A GPT's weights, packed for decode steps (nanochat/cpu_decode.py builds it from nanochat.gpt.GPT).
#[pyclass(frozen, weakref, module = "decode_kernels")]
struct DecodeModel {
    model: Model,
    held: Vec<Held>, // the buffers `model` points into
}

#[pymethods]
impl DecodeModel {
    /// embedding: float32 [vocab, width]; blocks: BlockBuffers, panels in bfloat16 bits when `bf16`;
    /// head: panels [width -> vocab]; cos, sin: gpt.py's rotary tables as float32 [positions, head_dim / 2].
    #[new]
    #[pyo3(signature = (*, embedding, blocks, head, cos, sin, vocab, width, heads, kv_heads, head_dim, fc_width, bf16, softcap))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(embedding: &Bound<'py, PyAny>, blocks: Vec<BlockBuffers<'py>>, head: &Bound<'py, PyAny>,
                cos: &Bound<'py, PyAny>, sin: &Bound<'py, PyAny>, vocab: usize, width: usize, heads: usize,
                kv_heads: usize, head_dim: usize, fc_width: usize, bf16: bool, softcap: f32) -> PyResult<Self> {
        if vocab == 0 || width == 0 || heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim == 0
            || !head_dim.is_multiple_of(2) || softcap.is_nan() || softcap <= 0.0 {
            return Err(value_error(format!("DecodeModel: inconsistent sizes: vocab {vocab}, width {width}, {heads} heads, \
                                            {kv_heads} kv heads of {head_dim}, softcap {softcap}")));
        }
        let mut weights = Weights { held: Vec::new(), bf16 };
        let (cos, sin, rotary_len) = weights.rotary(cos, sin, head_dim / 2)?;
        let sizes = Sizes { vocab, width, heads, kv_heads, dim: head_dim, fc_width, rotary_len };
        let (attention_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let embedding = weights.table(embedding, "embedding", &[vocab, width])?;
        let blocks = blocks.iter().enumerate().map(|(i, (qkv, out_proj, fc, proj, value_embed, lambdas))| {
            let name = |what: &str| format!("block {i}'s {what}");
            Ok(Block {
                qkv: weights.panels(qkv, &name("qkv"), width, attention_width + 2 * kv_width)?,
                out_proj: weights.panels(out_proj, &name("out_proj"), attention_width, width)?,
                fc: weights.panels(fc, &name("fc"), width, fc_width)?,
                proj: weights.panels(proj, &name("proj"), fc_width, width)?,
                value_embed: value_embed.as_ref().map(|table| weights.table(table, &name("value_embed"), &[vocab, kv_width]))
                                        .transpose()?,
                lambdas: *lambdas,
            })
        }).collect::<PyResult<Vec<_>>>()?;
        let head = weights.panels(head, "head", width, vocab)?;
        let model = Model { sizes, embedding, blocks, head, cos, sin, bf16, softcap };
        Ok(DecodeModel { model, held: weights.held })
    }

    /// Row r: token tokens[r] at position positions[r] of slot slots[r] -> its soft-capped logits into
    /// logits[r] (float32 [rows, vocab], written). cache: float32 [layers, 2, slots, kv_heads, capacity,
    /// head_dim], each row's key and value written at its position. Products and attentions of at least
    /// `parallel_min_work` multiply-adds are split over `threads` threads. Runs without the GIL.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (tokens, slots, positions, cache, logits, threads, parallel_min_work))]
    fn step(&self, py: Python<'_>, tokens: Vec<i64>, slots: Vec<i64>, positions: Vec<i64>, cache: &Bound<'_, PyAny>,
            logits: &Bound<'_, PyAny>, threads: usize, parallel_min_work: usize) -> PyResult<()> {
        let Sizes { vocab, kv_heads, dim, rotary_len, .. } = self.model.sizes;
        let layers = self.model.blocks.len();
        let cache = writable_buffer(cache, "cache")?;
        let (num_slots, capacity) = match *cache.shape() {
            [l, 2, slots, h, capacity, d] if l == layers && h == kv_heads && d == dim => (slots, capacity),
            ref shape => return Err(value_error(format!(
                "cache has shape {shape:?}, this model's is [{layers}, 2, slots, {kv_heads}, capacity, {dim}]"))),
        };
        let rows = tokens.len();
        if slots.len() != rows || positions.len() != rows {
            return Err(value_error(format!("{rows} tokens, {} slots and {} positions: one of each per row", slots.len(),
                                           positions.len())));
        }
        let tokens = indices(tokens, vocab, |t| format!("token {t} is outside the vocabulary (0..{vocab})"))?;
        let slots = indices(slots, num_slots, |s| format!("slot {s} is outside the cache's slots (0..{num_slots})"))?;
        let positions = indices(positions, capacity.min(rotary_len), |p| match usize::try_from(p) {
            Ok(p) if p < capacity => format!("position {p} is past the rotary table ({rotary_len} positions)"),
            _ => format!("position {p} is outside the cache (0..{capacity})"),
        })?;
        let logits = writable_buffer(logits, "logits")?;
        check_shape(&logits, "logits", &[rows, vocab])?;
        self.check_apart(&bytes_of(&cache), &bytes_of(&logits))?;
        // SAFETY: both are writable float32 buffers of exactly these sizes, held until the step returns, that
        // overlap nothing else the step touches (another Python thread writing them meanwhile is the caller's race)
        let (cache_data, logits_data) = unsafe {
            (std::slice::from_raw_parts_mut(cache.buf_ptr() as *mut f32, cache.item_count()),
             std::slice::from_raw_parts_mut(logits.buf_ptr() as *mut f32, logits.item_count()))
        };
        let cache_view = Cache { data: cache_data, slots: num_slots, capacity };
        let threads = Threads { count: threads, min_work: parallel_min_work };
        let simd = vectorized();
        // SAFETY: every index was checked above against the sizes the model's buffers were checked against
        py.detach(|| unsafe {
            self.model.step(&Rows { tokens: &tokens, slots: &slots, positions: &positions }, cache_view, logits_data,
                            threads, simd)
        });
        Ok(())
    }
}

impl DecodeModel {
    /// The step's two outputs share memory with nothing it reads or writes: the weights, or each other.
    fn check_apart(&self, cache: &Range<usize>, logits: &Range<usize>) -> PyResult<()> {
        let shared = |output: &Range<usize>| self.held.iter().any(|weight| overlap(&weight.bytes(), output));
        if overlap(cache, logits) || shared(cache) || shared(logits) {
            return Err(value_error("the cache and the logits must not share memory with each other or the weights".into()));
        }
        Ok(())
    }
}

/// Whether this CPU runs the AVX2 + FMA paths (else the scalar ones: the same bits, slower).
#[pyfunction(name = "vectorized")]
fn vectorized_for_python() -> bool {
    vectorized()
}

#[pymodule]
fn decode_kernels(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DecodeModel>()?;
    m.add_function(wrap_pyfunction!(vectorized_for_python, m)?)?;
    m.add("PANEL", PANEL)?;
    Ok(())
}
