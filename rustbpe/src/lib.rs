//! rustbpe: a fast byte-level BPE trainer with Python bindings.
//!
//! Training has two phases:
//! 1. split every text with the regex and count unique chunks ("words"), in parallel and without the GIL;
//! 2. merge: repeatedly take the most frequent adjacent pair (ties: smallest (left, right)), weighted by
//!    word frequency. Pair counts are updated incrementally from the words that contain the merged pair
//!    (an inverted index pair -> words), never recounted; a lazy max-heap finds the best pair.
//!
//! Speed and memory (measured by dev/bench_tokenizer.py): all words live in one flat id buffer and are
//! merged in place; the inverted index holds plain Vec<u32> word lists (not hash sets); for the known
//! GPT-4-style patterns the lookahead `\s+(?!\S)` is emulated so the whole split runs in the regex DFA
//! instead of fancy-regex's backtracking VM.
//!
//! The resulting merges are exported as tiktoken-style mergeable ranks so inference can use tiktoken.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::AHashMap;
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
    /// change in this word's pair counts (see `merge_in_place`).
    pub fn merge_pair(&mut self, pair: Pair, new_id: u32) -> Vec<(Pair, i64)> {
        let mut deltas = Vec::new();
        let len = merge_in_place(&mut self.ids, pair, new_id, &mut deltas);
        self.ids.truncate(len);
        deltas
    }
}

/// Merge `pair` into `new_id` inside `ids` (in place, left to right, non-overlapping), append the change
/// in pair counts to `deltas` and return the new length. Using the already-merged output as the left
/// neighbour makes runs like "a b a b" come out right: the (new, a) added by the first merge is removed
/// again by the second, leaving (new, new). In place and into a caller's buffer because the merge loop
/// calls this millions of times: one allocation per call was a large share of training time.
pub fn merge_in_place(ids: &mut [u32], pair: Pair, new_id: u32, deltas: &mut Vec<(Pair, i64)>) -> usize {
    let (a, b) = pair;
    let n = ids.len();
    if n < 2 {
        return n;
    }
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && ids[read] == a && ids[read + 1] == b {
            if write > 0 {
                let prev = ids[write - 1];
                deltas.push(((prev, a), -1));
                deltas.push(((prev, new_id), 1));
            }
            deltas.push(((a, b), -1));
            if read + 2 < n {
                let next = ids[read + 2];
                deltas.push(((b, next), -1));
                deltas.push(((new_id, next), 1));
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    write
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

/// All words in one flat buffer: word `i` is `ids[starts[i]..starts[i] + lens[i]]`. Merging only ever
/// shortens a word, so it is done in place. One allocation instead of one per unique chunk (millions)
/// saves both time and memory.
struct FlatWords {
    ids: Vec<u32>,
    starts: Vec<usize>,
    lens: Vec<u32>,
}

impl FlatWords {
    fn from_words(words: Vec<Word>) -> Self {
        let mut flat = FlatWords {
            ids: Vec::with_capacity(words.iter().map(|w| w.ids.len()).sum()),
            starts: Vec::with_capacity(words.len()),
            lens: Vec::with_capacity(words.len()),
        };
        for word in words {
            flat.push(&word.ids);
        }
        flat
    }

    fn push(&mut self, ids: &[u32]) {
        self.starts.push(self.ids.len());
        self.lens.push(ids.len() as u32);
        self.ids.extend_from_slice(ids);
    }

    fn word(&self, i: usize) -> &[u32] {
        &self.ids[self.starts[i]..self.starts[i] + self.lens[i] as usize]
    }
}

/// Which words contain a pair: word indices, each listed once. A Vec, not a hash set: several times
/// smaller, and only ever appended to, walked and dropped. Entries may go stale (the pair was merged
/// away inside that word by an earlier merge); merging such a word is a no-op.
type WordList = Vec<u32>;

fn push_word(list: &mut WordList, word_index: u32) {
    // a word's pairs are visited together, so a repeat is always the last entry
    if list.last() != Some(&word_index) {
        list.push(word_index);
    }
}

/// Count every adjacent pair (weighted by word count) and remember which words contain it.
fn count_pairs(words: &FlatWords, counts: &[i64]) -> (AHashMap<Pair, i64>, AHashMap<Pair, WordList>) {
    (0..counts.len())
        .into_par_iter()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pair_counts, mut where_found): (AHashMap<Pair, i64>, AHashMap<Pair, WordList>), i| {
                let ids = words.word(i);
                if counts[i] != 0 && ids.len() >= 2 {
                    for w in ids.windows(2) {
                        let pair = (w[0], w[1]);
                        *pair_counts.entry(pair).or_default() += counts[i];
                        push_word(where_found.entry(pair).or_default(), i as u32);
                    }
                }
                (pair_counts, where_found)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(counts_a, where_a), (counts_b, where_b)| {
                // fold the smaller maps into the larger ones; folds cover disjoint words, so lists just concatenate
                let (mut counts_big, counts_small) = if counts_a.len() >= counts_b.len() { (counts_a, counts_b) } else { (counts_b, counts_a) };
                for (pair, c) in counts_small {
                    *counts_big.entry(pair).or_default() += c;
                }
                let (mut where_big, where_small) = if where_a.len() >= where_b.len() { (where_a, where_b) } else { (where_b, where_a) };
                for (pair, list) in where_small {
                    where_big.entry(pair).or_default().extend(list);
                }
                (counts_big, where_big)
            },
        )
}

/// The merge loop. Returns the merges in order as (pair, new id); stops early (returning fewer merges)
/// when no pair occurs any more.
pub fn train_merges(words: Vec<Word>, counts: &[i64], num_merges: usize) -> Vec<(Pair, u32)> {
    train_flat(FlatWords::from_words(words), counts, num_merges)
}

fn train_flat(mut words: FlatWords, counts: &[i64], num_merges: usize) -> Vec<(Pair, u32)> {
    let (mut pair_counts, mut where_found) = count_pairs(&words, counts);
    let mut heap: BinaryHeap<MergeJob> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| MergeJob { count, pair })
        .collect();
    let mut merges: Vec<(Pair, u32)> = Vec::with_capacity(num_merges);
    let mut deltas: Vec<(Pair, i64)> = Vec::with_capacity(64);
    let mut touched: Vec<Pair> = Vec::new();
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
        touched.clear();
        for &wi in &word_indices {
            let i = wi as usize;
            let start = words.starts[i];
            let len = words.lens[i] as usize;
            deltas.clear();
            words.lens[i] = merge_in_place(&mut words.ids[start..start + len], top.pair, new_id, &mut deltas) as u32;
            let weight = counts[i];
            for &(pair, delta) in &deltas {
                let count = pair_counts.entry(pair).or_default();
                *count += delta * weight;
                if delta > 0 {
                    let list = where_found.entry(pair).or_default();
                    if list.is_empty() {
                        // every pair that gains occurrences contains new_id, so it is new: first touch
                        touched.push(pair);
                    }
                    push_word(list, wi);
                } else if *count == 0 {
                    // gone from every word: its word list is all stale, free it now
                    pair_counts.remove(&pair);
                    where_found.remove(&pair);
                }
            }
        }
        pair_counts.remove(&top.pair);
        // push each new pair once, with its final count; trim the lists' doubling slack (memory)
        for pair in &touched {
            let count = *pair_counts.get(pair).unwrap_or(&0);
            if count > 0 {
                heap.push(MergeJob { count, pair: *pair });
            }
            if let Some(list) = where_found.get_mut(pair) {
                list.shrink_to_fit();
            }
        }
    }
    merges
}

/// GPT-4's own split pattern (digits 1-3): the other pattern `Splitter` knows how to run fast.
pub const GPT4_PATTERN_DIGITS_1_3: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Splits text into chunks with the split pattern. For the GPT-4-style patterns it runs an equivalent
/// pattern without lookahead or possessive quantifiers straight on the regex crate's lazy DFA (several
/// times faster than fancy-regex's backtracking VM):
/// - `?+` and `++` are possessive only where giving a character back could never lead to a match
///   (the next item can't match what they consumed), so plain `?` and `+` match the same;
/// - `\s+(?!\S)|\s+` becomes `\s+`, and a whitespace run that it matches (the only way a match can end
///   in whitespace other than \r or \n) gives its last character back when more than one character
///   long and followed by text: exactly what the lookahead does (that char then starts the next chunk);
/// - every character is matched by some branch, so each chunk starts where the previous one ended: the
///   search is anchored there, which spares the DFA its reverse pass to find where a match starts.
///
/// Any other pattern runs as given through fancy-regex.
#[derive(Clone, Debug)]
pub enum Splitter {
    Fast(regex_automata::meta::Regex),
    General(Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == GPT4_PATTERN || pattern == GPT4_PATTERN_DIGITS_1_3 {
            let simple = pattern.replace("?+", "?").replace("++", "+").replace(r"|\s+(?!\S)|\s+", r"|\s+");
            let regex = regex_automata::meta::Regex::new(&simple).map_err(|e| format!("invalid split pattern {simple:?}: {e}"))?;
            return Ok(Splitter::Fast(regex));
        }
        Regex::new(pattern).map(Splitter::General).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        let regex = match self {
            Splitter::General(regex) => {
                for m in regex.find_iter(text) {
                    f(m.map_err(|e| format!("regex failed while splitting text: {e}"))?.as_str());
                }
                return Ok(());
            }
            Splitter::Fast(regex) => regex,
        };
        let mut input = regex_automata::Input::new(text).anchored(regex_automata::Anchored::Yes);
        let mut pos = 0;
        while pos < text.len() {
            input.set_start(pos);
            let Some(m) = regex.search(&input) else {
                return Err(format!("split pattern matched nothing at byte {pos} of a text (a bug in the fast split path)"));
            };
            let mut end = m.end();
            if end < text.len() {
                let mut chars = text[pos..end].chars();
                let last = chars.next_back();
                let is_run = matches!(last, Some(c) if c.is_whitespace() && c != '\r' && c != '\n');
                if is_run && chars.next().is_some() {
                    end -= last.unwrap().len_utf8();
                }
            }
            f(&text[pos..end]);
            pos = end;
        }
        Ok(())
    }
}

/// Split texts and count unique chunks, in parallel: one contiguous slice of texts per task, each with
/// its own clone of the regex (a shared one made the threads contend for its scratch-space pool).
fn count_chunks(splitter: &Splitter, texts: &[String]) -> Result<AHashMap<CompactString, i64>, String> {
    let tasks = rayon::current_num_threads() * 4;
    let per_task = texts.len().div_ceil(tasks).max(1);
    texts
        .par_chunks(per_task)
        .map(|slice| {
            let splitter = splitter.clone();
            let mut local: AHashMap<CompactString, i64> = AHashMap::new();
            for text in slice {
                splitter.for_each_chunk(text, |chunk| match local.get_mut(chunk) {
                    Some(count) => *count += 1, // no key built for the common case: a chunk seen before
                    None => {
                        local.insert(CompactString::from(chunk), 1);
                    }
                })?;
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

fn encode_text(splitter: &Splitter, ranks: &AHashMap<Pair, u32>, text: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::with_capacity(text.len() / 3);
    splitter.for_each_chunk(text, |chunk| encode_chunk(chunk.as_bytes(), ranks, &mut out))?;
    Ok(out)
}

fn compile_pattern(pattern: &str) -> PyResult<Splitter> {
    Splitter::new(pattern).map_err(PyValueError::new_err)
}

/// Byte-level BPE tokenizer: train merges, export them, encode.
#[pyclass]
pub struct Tokenizer {
    merges: Vec<(Pair, u32)>,
    ranks: AHashMap<Pair, u32>,
    pattern: String,
    regex: Splitter,
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
            // straight into the flat layout: no per-word Vec in between (peak memory)
            let total_bytes: usize = chunk_counts.keys().map(|chunk| chunk.len()).sum();
            let mut words = FlatWords {
                ids: Vec::with_capacity(total_bytes),
                starts: Vec::with_capacity(chunk_counts.len()),
                lens: Vec::with_capacity(chunk_counts.len()),
            };
            let mut counts = Vec::with_capacity(chunk_counts.len());
            let mut ids: Vec<u32> = Vec::new();
            for (chunk, count) in chunk_counts {
                ids.clear();
                ids.extend(chunk.as_bytes().iter().map(|&b| b as u32));
                words.push(&ids);
                counts.push(count);
            }
            train_flat(words, &counts, num_merges)
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
        let regex = Splitter::new(GPT4_PATTERN).unwrap();
        let texts: Vec<String> = (0..200).map(|i| format!("word{} common words here", i % 7)).collect();
        let counts = count_chunks(&regex, &texts).unwrap();
        assert_eq!(counts.get(" common"), Some(&200));
        assert_eq!(counts.values().sum::<i64>(), 200 * 5);
    }

    /// Small deterministic generator (no extra dev-dependency for random tests).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[test]
    fn fast_splitter_equals_fancy_regex() {
        // whitespace of every kind next to letters, digits, punctuation, newlines and multi-byte chars
        let alphabet = [
            " ", "  ", "\t", "\n", "\r", "\r\n", "\u{a0}", "\u{3000}", "\u{2028}", "\u{85}", "a", "Z", "s", "t", "ll",
            "ve", "RE", "'", "é", "日本", "\u{301}", "1", "23", "٣", "½", "!", ".", "--", "_", "🙂", "\u{200d}", "x",
        ];
        let mut rng = Lcg(42);
        let mut texts: Vec<String> = vec![
            "".into(), " ".into(), "   ".into(), "a   b".into(), "a   \n  b  ".into(), "x \t\u{3000}5".into(),
            "hello world  \n\n  foo's bar!!\r\n 12345 ".into(), "\u{a0}\u{a0}word".into(),
        ];
        for _ in 0..20_000 {
            let len = rng.below(24);
            texts.push((0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect());
        }
        for pattern in [GPT4_PATTERN, GPT4_PATTERN_DIGITS_1_3] {
            let fast = Splitter::new(pattern).unwrap();
            assert!(matches!(fast, Splitter::Fast(_)));
            let reference = Regex::new(pattern).unwrap();
            for text in &texts {
                let want: Vec<&str> = reference.find_iter(text).map(|m| m.unwrap().as_str()).collect();
                let mut got: Vec<&str> = Vec::new();
                fast.for_each_chunk(text, |chunk| got.push(chunk)).unwrap();
                assert_eq!(got, want, "split differs for {text:?}");
            }
        }
    }

    #[test]
    fn incremental_training_equals_naive_on_random_words() {
        // a 3-letter alphabet makes long runs, overlaps and ties: the hard cases for the bookkeeping
        let mut rng = Lcg(7);
        let texts: Vec<String> = (0..300).map(|_| (0..rng.below(14)).map(|_| ["a", "b", "c"][rng.below(3)]).collect()).collect();
        let words: Vec<Word> = texts.iter().map(|t| Word::new(t.bytes().map(|b| b as u32).collect())).collect();
        let counts: Vec<i64> = (0..words.len()).map(|_| 1 + rng.below(5) as i64).collect();
        let fast = train_merges(words.clone(), &counts, 80);
        let slow = naive_train(words, &counts, 80);
        assert_eq!(fast, slow);
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
        let regex = Splitter::new(GPT4_PATTERN).unwrap();
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
