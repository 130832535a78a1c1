//! rustbpe: a fast byte-level BPE trainer with Python bindings.
//!
//! Training has two phases:
//! 1. split every text with the regex and count unique chunks ("words"), in parallel and without the GIL;
//! 2. merge: repeatedly take the most frequent adjacent pair (ties: smallest (left, right)), weighted by
//!    word frequency. Pair counts are updated incrementally from the words that contain the merged pair
//!    (an inverted index pair -> words), never recounted; a lazy max-heap finds the best pair.
//!
//! The resulting merges are exported as tiktoken-style mergeable ranks so inference can use tiktoken.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::{AHashMap, AHashSet};
use compact_str::CompactString;
use fancy_regex::Regex;
use pyo3::exceptions::{PyTypeError, PyUserWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rayon::prelude::*;

/// GPT-4's split pattern, except digits are grouped 1-2 at a time (not 1-3): measured to waste fewer
/// merges on number chunks at small vocab sizes.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub type Pair = (u32, u32);

/// One unique chunk of text as a sequence of token ids.
#[derive(Clone, Debug)]
pub struct Word {
    pub ids: Vec<u32>,
}

impl Word {
    pub fn new(ids: Vec<u32>) -> Self {
        Word { ids }
    }

    pub fn pairs(&self) -> impl Iterator<Item = Pair> + '_ {
        self.ids.windows(2).map(|w| (w[0], w[1]))
    }

    /// Replace every non-overlapping occurrence (left to right) of `pair` by `new_id` and return the
    /// change in this word's pair counts. Using the already-merged output as the left neighbour makes
    /// runs like "a b a b" come out right: the (new, a) added by the first merge is removed again by
    /// the second, leaving (new, new).
    pub fn merge_pair(&mut self, pair: Pair, new_id: u32) -> Vec<(Pair, i64)> {
        let (a, b) = pair;
        let n = self.ids.len();
        if n < 2 {
            return Vec::new();
        }
        let mut out: Vec<u32> = Vec::with_capacity(n);
        let mut deltas: Vec<(Pair, i64)> = Vec::with_capacity(6);
        let mut i = 0;
        while i < n {
            if i + 1 < n && self.ids[i] == a && self.ids[i + 1] == b {
                if let Some(&prev) = out.last() {
                    deltas.push(((prev, a), -1));
                    deltas.push(((prev, new_id), 1));
                }
                deltas.push(((a, b), -1));
                if i + 2 < n {
                    let next = self.ids[i + 2];
                    deltas.push(((b, next), -1));
                    deltas.push(((new_id, next), 1));
                }
                out.push(new_id);
                i += 2;
            } else {
                out.push(self.ids[i]);
                i += 1;
            }
        }
        self.ids = out;
        deltas
    }
}

/// A heap entry: the count a pair had when it was pushed. Counts of existing pairs only ever go down
/// (every new adjacency involves the freshly minted token, i.e. a new pair), so a stale entry is
/// recognised by comparing with the live count and re-pushed with it.
#[derive(Debug, Eq, PartialEq)]
struct MergeJob {
    count: i64,
    pair: Pair,
}

impl Ord for MergeJob {
    fn cmp(&self, other: &Self) -> Ordering {
        // max-heap on count; on ties the smaller pair must come out first
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Count every adjacent pair (weighted by word count) and remember which words contain it.
fn count_pairs(words: &[Word], counts: &[i64]) -> (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<u32>>) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pair_counts, mut where_found): (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<u32>>), (i, w)| {
                if counts[i] != 0 && w.ids.len() >= 2 {
                    for pair in w.pairs() {
                        *pair_counts.entry(pair).or_default() += counts[i];
                        where_found.entry(pair).or_insert_with(AHashSet::new).insert(i as u32);
                    }
                }
                (pair_counts, where_found)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut counts_a, mut where_a), (counts_b, where_b)| {
                for (pair, c) in counts_b {
                    *counts_a.entry(pair).or_default() += c;
                }
                for (pair, set) in where_b {
                    where_a.entry(pair).or_insert_with(AHashSet::new).extend(set);
                }
                (counts_a, where_a)
            },
        )
}

/// The merge loop. Returns the merges in order as (pair, new id); stops early (returning fewer merges)
/// when no pair occurs any more.
pub fn train_merges(mut words: Vec<Word>, counts: &[i64], num_merges: usize) -> Vec<(Pair, u32)> {
    let (mut pair_counts, mut where_found) = count_pairs(&words, counts);
    let mut heap: BinaryHeap<MergeJob> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| MergeJob { count, pair })
        .collect();
    let mut merges: Vec<(Pair, u32)> = Vec::with_capacity(num_merges);
    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        let live = *pair_counts.get(&top.pair).unwrap_or(&0);
        if live != top.count {
            if live > 0 {
                heap.push(MergeJob { count: live, pair: top.pair });
            }
            continue;
        }
        if live <= 0 {
            break;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push((top.pair, new_id));

        let word_indices = where_found.remove(&top.pair).unwrap_or_default();
        let mut touched: AHashSet<Pair> = AHashSet::new();
        for &wi in &word_indices {
            let wi_usize = wi as usize;
            let weight = counts[wi_usize];
            for (pair, delta) in words[wi_usize].merge_pair(top.pair, new_id) {
                *pair_counts.entry(pair).or_default() += delta * weight;
                if delta > 0 {
                    where_found.entry(pair).or_insert_with(AHashSet::new).insert(wi);
                    touched.insert(pair);
                }
            }
        }
        pair_counts.remove(&top.pair);
        // every pair that gained occurrences contains new_id, so it is new: push it once, with its final count
        for pair in touched {
            let count = *pair_counts.get(&pair).unwrap_or(&0);
            if count > 0 {
                heap.push(MergeJob { count, pair });
            }
        }
    }
    merges
}

/// Split texts with the regex and count unique chunks, in parallel.
fn count_chunks(regex: &Regex, texts: &[String]) -> Result<AHashMap<CompactString, i64>, String> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut local: AHashMap<CompactString, i64>, text| {
            for m in regex.find_iter(text) {
                let m = m.map_err(|e| format!("regex failed while splitting text: {e}"))?;
                *local.entry(CompactString::from(m.as_str())).or_default() += 1;
            }
            Ok(local)
        })
        .try_reduce(AHashMap::new, |a, b| {
            // fold the smaller map into the larger one
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (k, v) in small {
                *big.entry(k).or_default() += v;
            }
            Ok(big)
        })
}

/// Merge ranks keyed by pair, for encoding.
fn merge_ranks(merges: &[(Pair, u32)]) -> AHashMap<Pair, u32> {
    merges.iter().cloned().collect()
}

/// Encode one chunk's bytes: apply the lowest-ranked applicable merge until none applies (a merge's
/// rank is also the id it creates, so this reproduces the training order, as tiktoken does).
fn encode_chunk(bytes: &[u8], ranks: &AHashMap<Pair, u32>, out: &mut Vec<u32>) {
    let mut word = Word::new(bytes.iter().map(|&b| b as u32).collect());
    loop {
        let best = word.pairs().filter_map(|p| ranks.get(&p).map(|&r| (r, p))).min();
        let Some((rank, pair)) = best else { break };
        word.merge_pair(pair, rank);
    }
    out.extend_from_slice(&word.ids);
}

fn encode_text(regex: &Regex, ranks: &AHashMap<Pair, u32>, text: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::with_capacity(text.len() / 3);
    for m in regex.find_iter(text) {
        let m = m.map_err(|e| format!("regex failed while splitting text: {e}"))?;
        encode_chunk(m.as_str().as_bytes(), ranks, &mut out);
    }
    Ok(out)
}

fn compile_pattern(pattern: &str) -> PyResult<Regex> {
    Regex::new(pattern).map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))
}

/// Byte-level BPE tokenizer: train merges, export them, encode.
#[pyclass]
pub struct Tokenizer {
    merges: Vec<(Pair, u32)>,
    ranks: AHashMap<Pair, u32>,
    pattern: String,
    regex: Regex,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Tokenizer {
            merges: Vec::new(),
            ranks: AHashMap::new(),
            pattern: GPT4_PATTERN.to_string(),
            regex: compile_pattern(GPT4_PATTERN)?,
        })
    }

    /// Train on the `str` items of any Python iterator, pulling `buffer_size` at a time.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let regex = compile_pattern(&pattern)?;

        let mut chunk_counts: AHashMap<CompactString, i64> = AHashMap::new();
        let mut iter = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err("train_from_iterator needs an iterable of str (e.g. a generator of documents)")
        })?;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        loop {
            buffer.clear();
            for item in iter.by_ref().take(buffer_size) {
                let item = item?; // an exception raised by the iterator reaches Python unchanged
                let text = item.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, got {}",
                        item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    ))
                })?;
                buffer.push(text.to_str()?.to_owned());
            }
            if buffer.is_empty() {
                break;
            }
            let local = py.detach(|| count_chunks(&regex, &buffer)).map_err(PyValueError::new_err)?;
            for (k, v) in local {
                *chunk_counts.entry(k).or_default() += v;
            }
        }

        let num_merges = vocab_size - 256;
        let merges = py.detach(move || {
            let mut words = Vec::with_capacity(chunk_counts.len());
            let mut counts = Vec::with_capacity(chunk_counts.len());
            for (chunk, count) in chunk_counts {
                words.push(Word::new(chunk.as_bytes().iter().map(|&b| b as u32).collect()));
                counts.push(count);
            }
            train_merges(words, &counts, num_merges)
        });
        if merges.len() < num_merges {
            let message = format!(
                "rustbpe: ran out of pairs to merge after {} merges; vocabulary has {} tokens instead of the requested {}",
                merges.len(),
                256 + merges.len(),
                vocab_size
            );
            let warning_type = py.get_type::<PyUserWarning>();
            PyErr::warn(py, &warning_type, &std::ffi::CString::new(message).unwrap(), 1)?;
        }
        self.ranks = merge_ranks(&merges);
        self.merges = merges;
        self.pattern = pattern;
        self.regex = regex;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// tiktoken-style ranks: the 256 single bytes, then one entry per merge, in rank order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &((left, right), _) in &self.merges {
            let mut merged = token_bytes[left as usize].clone();
            merged.extend_from_slice(&token_bytes[right as usize]);
            token_bytes.push(merged);
        }
        let items: Vec<(Bound<'py, PyBytes>, u32)> =
            token_bytes.iter().enumerate().map(|(rank, b)| (PyBytes::new(py, b), rank as u32)).collect();
        PyList::new(py, items)
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| encode_text(&self.regex, &self.ranks, text)).map_err(PyValueError::new_err)
    }

    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.detach(|| texts.par_iter().map(|t| encode_text(&self.regex, &self.ranks, t)).collect::<Result<Vec<_>, String>>())
            .map_err(PyValueError::new_err)
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recount(words: &[Word], counts: &[i64]) -> AHashMap<Pair, i64> {
        let mut m = AHashMap::new();
        for (w, &c) in words.iter().zip(counts) {
            for p in w.pairs() {
                *m.entry(p).or_default() += c;
            }
        }
        m
    }

    /// Reference trainer: recount every pair from scratch before each merge.
    fn naive_train(mut words: Vec<Word>, counts: &[i64], num_merges: usize) -> Vec<(Pair, u32)> {
        let mut merges = Vec::new();
        for k in 0..num_merges {
            let pc = recount(&words, counts);
            let best = pc.iter().filter(|(_, &c)| c > 0).max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then(pb.cmp(pa)));
            let Some((&pair, _)) = best else { break };
            let new_id = 256 + k as u32;
            for w in words.iter_mut() {
                w.merge_pair(pair, new_id);
            }
            merges.push((pair, new_id));
        }
        merges
    }

    fn words_of(texts: &[&str]) -> (Vec<Word>, Vec<i64>) {
        let words = texts.iter().map(|t| Word::new(t.bytes().map(|b| b as u32).collect())).collect();
        let counts = texts.iter().enumerate().map(|(i, _)| 1 + (i as i64 % 3)).collect();
        (words, counts)
    }

    #[test]
    fn merge_pair_deltas_match_a_recount() {
        for text in ["abab", "aaaa", "aaa", "xabyab", "ab", "a", "", "abcabcab", "bababab"] {
            let mut word = Word::new(text.bytes().map(|b| b as u32).collect());
            let before = recount(&[word.clone()], &[1]);
            let deltas = word.merge_pair((b'a' as u32, b'b' as u32), 999);
            let after = recount(&[word.clone()], &[1]);
            let mut applied = before.clone();
            for (p, d) in deltas {
                *applied.entry(p).or_default() += d;
            }
            applied.retain(|_, c| *c != 0);
            assert_eq!(applied, after, "bookkeeping wrong for {text:?}");
        }
    }

    #[test]
    fn chunk_counts_survive_the_parallel_reduce() {
        let regex = Regex::new(GPT4_PATTERN).unwrap();
        let texts: Vec<String> = (0..200).map(|i| format!("word{} common words here", i % 7)).collect();
        let counts = count_chunks(&regex, &texts).unwrap();
        assert_eq!(counts.get(" common"), Some(&200));
        assert_eq!(counts.values().sum::<i64>(), 200 * 5);
    }

    #[test]
    fn overlapping_runs_merge_left_to_right() {
        let mut word = Word::new(vec![1, 1, 1]);
        word.merge_pair((1, 1), 300);
        assert_eq!(word.ids, vec![300, 1]);
    }

    #[test]
    fn incremental_training_equals_naive_recount() {
        let texts = ["hello", " world", " hello", " hell", "aaaaaa", "abababab", " the", " then", "their", "xx", "x"];
        let (words, counts) = words_of(&texts);
        let fast = train_merges(words.clone(), &counts, 40);
        let slow = naive_train(words, &counts, 40);
        assert_eq!(fast, slow);
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // (a,b) and (c,d) both occur once: (a,b) = (97,98) is smaller
        let (words, _) = words_of(&["cd", "ab"]);
        let merges = train_merges(words, &[1, 1], 1);
        assert_eq!(merges[0].0, (b'a' as u32, b'b' as u32));
    }

    #[test]
    fn stops_when_no_pairs_remain() {
        let (words, counts) = words_of(&["ab"]);
        let merges = train_merges(words, &counts, 10);
        assert_eq!(merges.len(), 1);
    }

    #[test]
    fn encode_round_trips_training_text() {
        let regex = Regex::new(GPT4_PATTERN).unwrap();
        let texts = vec!["hello hello world 123456 naïve 日本語 🙂🙂".to_string()];
        let counts_map = count_chunks(&regex, &texts).unwrap();
        let mut words = Vec::new();
        let mut counts = Vec::new();
        for (k, v) in counts_map {
            words.push(Word::new(k.as_bytes().iter().map(|&b| b as u32).collect()));
            counts.push(v);
        }
        let merges = train_merges(words, &counts, 30);
        let ranks = merge_ranks(&merges);
        let ids = encode_text(&regex, &ranks, &texts[0]).unwrap();
        let mut table: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &((l, r), _) in &merges {
            let mut m = table[l as usize].clone();
            m.extend_from_slice(&table[r as usize]);
            table.push(m);
        }
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| table[i as usize].clone()).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), texts[0]);
        assert!(ids.len() < texts[0].len());
    }
}
