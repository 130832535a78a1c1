"""
FactQA: short factual questions asked both ways, "Which city is the capital of France?" -> Paris and
"Paris is the capital of which country?" -> France, an offline stand-in for factual chat data built from
the embedded sample corpus (the Wikipedia lead summaries of nanochat/sample_data, CC BY-SA 4.0, see
nanochat/sample_data/NOTICE). tasks/wikiqa.py asks about a summary's subject ("What is Paris?" -> its
summary); most questions people ask go the other way, from a thing to one fact about it or from the fact
back to the thing, and a model only learns to pull a fact out of what it read when it is asked for it.

Facts. Each summary's opening is matched against a few simple patterns, one per relation; what matches is
a fact (relation, subject, value), e.g. "Paris is the capital and largest city of France" ->
capital(France) = Paris. The relations and what they read:

    capital      "X is the capital (and largest city) of Y"; a country's "Its capital (and largest city) is X"
    symbol       "Gold is a chemical element; its chemical symbol is Au" (and "has the symbol", "with the symbol")
    planet       "Mars is the fourth planet from the Sun"
    creator      "Pride and Prejudice is a novel by English author Jane Austen" (novels, plays, poems, paintings,
                 operas, films "directed by"...; the verb asked is wrote / painted / composed / directed)
    person       "Denis Diderot was a French philosopher" (a known nationality word and a known occupation)
    located      "Hungary is a landlocked country in Central Europe" (cities, rivers, lakes, mountains, countries)
    superlative  "Istanbul is the largest city in Turkey", "Mount Everest is the highest mountain on Earth"

Only the first sentence of a summary is read (the country's "Its capital is" sentence: the first paragraph),
names must look like names (capitalized words, a few particles such as "de" or "of the"), and a value is
dropped when it is too long to be a name, so a pattern that misreads a sentence mostly fails to match
instead of producing a wrong fact. Two summaries that disagree (two cities both read as the capital of one
place) drop the fact. tests/test_factqa.py checks the precision on a hand-labelled sample.

Questions. Every fact is asked in each direction its relation has: subject -> value (the capital of France)
and value -> subject (which country has Paris as its capital, which element has the symbol Au, who wrote
Pride and Prejudice, which planet is fourth from the Sun, what is the largest city in Turkey), in several
phrasings, and the reply is one sentence that states the fact ("The capital of France is Paris."). A
question whose answer is already in its own words ("Mexico City is the capital of which country?") is left
out: echoing the question would answer it.

Splits, both held out honestly: the facts are split by a hash of the fact (1 in 5 goes to test), so a test
question is about a fact no train question asks about, in either direction, and the two splits ask with
different templates (TRAIN_TEMPLATES / TEST_TEMPLATES). The test split therefore measures whether a model
can retrieve a fact it only read during pretraining, in a phrasing it was not drilled on. dev/eval_facts.py
asks about train facts with a third set of hand-written phrasings. Both splits read the corpus' train file:
a fact only in the val file was never read, so asking it would measure guessing.

evaluate(): exact answers by words: a reply is right when every word of one accepted answer appears in it
(lowercased, "\\w+" words): "Paris" in "The capital of France is Paris.", "Jane Austen" in "It was written by
Jane Austen.". A reply that names several candidates passes too; the replies are one short sentence.
"""
import functools
import random
import re
import zlib
from dataclasses import dataclass

from nanochat.sample_corpus import document_source, sample_documents
from tasks.common import Task
from tasks.wikiqa import sentences, summary_subject

TEST_FRACTION = 5  # 1 fact in TEST_FRACTION is held out (by hash, so stable as the corpus or code changes)
MAX_NAME_WORDS = 5  # a longer "name" is nearly always a clause the pattern misread

# ---------------------------------------------------------------------------------------------- reading facts

# A name: capitalized words, possibly joined by particles ("Rio de Janeiro", "Trinidad and Tobago", "the
# Democratic Republic of the Congo"); initials and hyphens inside words ("T. S. Eliot", "Port-au-Prince")
NAME_WORD = r"(?:[A-Z]\.(?:[A-Z]\.)*|[A-Z][\w'’\-]*)"
PARTICLES = r"(?:de|da|del|do|dos|di|du|la|le|el|al|von|van|der|den|of|the|and|y|bin|ibn|bint)"
NAME = rf"{NAME_WORD}(?:(?: {PARTICLES})* {NAME_WORD})*"
# what follows a name that ends it: punctuation, a parenthesis, or a lowercase word
NAME_END = r"(?=[,.;:(]| [a-z]|$)"

CAPITAL_RE = re.compile(rf"^(?:The )?({NAME})(?:, [^,]{{1,60}},)? (?:is|was) the capital(?: city)?"
                        rf"(?: and (?:the )?(?:largest|most populous) city)? (?:of|in) (?:the )?({NAME}){NAME_END}")
# in a place's own summary: "Its capital and largest city is Kigali", "The nation's capital and most populous city is Berlin"
OWN_CAPITAL_RE = re.compile(rf"(?:^|\. )(?:Its|The nation's|The country's|The state's|The province's|The region's) capital"
                            rf"(?: city)?(?:,? (?:and )?[a-z ,]{{0,60}}?)? is ({NAME}){NAME_END}")
PLACE_KIND_RE = re.compile(r"\b(?:country|state|province|nation|kingdom|republic|region|territory|island|archipelago)\b")
SYMBOL_RE = re.compile(r"^([A-Z][a-z]+) is a chemical element(?:;|,| with)(?: it has| its chemical| its)?(?: the)?(?: chemical)? "
                       r"symbol (?:is )?([A-Z][a-z]?)\b")
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
PLANET_RE = re.compile(rf"^([A-Z][a-z]+) is the ({'|'.join(ORDINALS)}) planet from the Sun")
# the words before a creator's name that describe them: "the (Russian and American) novelist", "the Early Netherlandish painter"
DESCRIBING_WORD = r"(?:[A-Z][a-z]+(?:an|ese|ish|ch|ic)|Early|Renaissance|Impressionist|Song dynasty)"
# a work, its kind and who made it: "X is a 1960 Southern Gothic novel by American author Harper Lee"
WORK_KINDS = {"novel": "wrote", "novella": "wrote", "play": "wrote", "poem": "wrote", "epic poem": "wrote",
              "tragedy": "wrote", "comedy": "wrote", "book": "wrote", "treatise": "wrote", "short story": "wrote",
              "painting": "painted", "opera": "composed", "symphony": "composed", "ballet": "composed", "film": "directed"}
CREATOR_RE = re.compile(
    rf"^((?:The |A |An )?{NAME})(?:, [^,]{{1,60}},)? (?:is|was) an? (?:[\w\-]+ ){{0,5}}?"
    rf"({'|'.join(sorted(WORK_KINDS, key=len, reverse=True))})(?: (?:in|on|for) [\w ]{{1,30}}?)?"
    rf" (?:(?:written|composed|painted|directed|written and directed|produced and directed|written and illustrated) )?by "
    rf"(?:the )?(?:{DESCRIBING_WORD}(?: and {DESCRIBING_WORD})? )*(?:(?:author|writer|novelist|playwright|poet|painter|artist|composer|"
    rf"philosopher|director|filmmaker|dramatist)(?: and \w+)? )?({NAME}){NAME_END}")
# films only by "directed by": a film "by" someone is often its studio or producer
FILM_NEEDS = "directed by"
# "Denis Diderot was a French philosopher", "Yasujirō Ozu was a Japanese filmmaker"
PERSON_RE = re.compile(rf"^({NAME}) (was|is) an? ((?:(?:North|South|East|West|Ancient) )?[A-Z][a-z]+(?:-[A-Z][a-z]+)?) "
                       r"(?:[a-z\-]+ ){0,2}?([a-z]+)\b")
DEMONYM_ENDINGS = ("an", "ian", "ese", "ish", "ch", "i", "ic", "ss", "ot", "k")
NOT_A_NATIONALITY = {"Renaissance", "Catholic", "Christian", "Protestant", "Muslim", "Islamic", "Jewish", "Romantic", "Baroque",
                     "Classical", "Republican", "Democratic", "Socratic", "Hindu", "Buddhist", "Roman Catholic", "Anglican",
                     "Lutheran", "Neoclassical", "Impressionist", "Gothic", "Medieval", "Vedic"}
OCCUPATIONS = set("""
actor actress architect astronomer astronaut athlete author aviator biologist boxer botanist cartographer chemist
choreographer comedian composer conductor dancer designer diplomat director dramatist economist emperor engineer
entrepreneur essayist explorer filmmaker footballer general geographer historian illustrator industrialist inventor
journalist jurist king lawyer linguist logician mathematician missionary monk musician mystic naturalist navigator
novelist painter pharaoh philosopher photographer physician physicist pianist playwright poet politician pope priest
printmaker prophet psychiatrist psychologist queen revolutionary rapper ruler saint scholar scientist sculptor singer
singer-songwriter sociologist soldier songwriter statesman stateswoman theologian theorist violinist writer zoologist
""".split())
# "Hungary is a landlocked country in Central Europe", "The Danube is a river in Europe"
LOCATED_KINDS = ("city", "town", "port city", "capital city", "river", "lake", "mountain", "mountain range", "volcano", "desert",
                 "island", "country", "island country", "state", "province", "region", "sea", "peninsula")
LOCATED_RE = re.compile(
    rf"^((?:The )?{NAME})(?:, [^,]{{1,60}},)? is an? (?:[a-z\-]+ ){{0,2}}?({'|'.join(sorted(LOCATED_KINDS, key=len, reverse=True))})"
    rf" (?:located )?in (?:(?:north|south|east|west|central|north-?eastern|north-?western|south-?eastern|south-?western|"
    rf"northern|southern|eastern|western) )?({NAME}){NAME_END}")
# Southern France is in France: a leading compass adjective is dropped from the answer (Central Europe is a name, kept)
COMPASS_PREFIX_RE = re.compile(r"^(?:Northern|Southern|Eastern|Western|Northeastern|Northwestern|Southeastern|Southwestern) (?=[A-Z])")
# "the Italian region of Tuscany": an adjective where a place name should be
ADJECTIVE_RE = re.compile(r"^[A-Z][a-z]+(?:ian|ese|ish|can)$")
# "Istanbul is the largest city in Turkey", "Mount Everest is the highest mountain on Earth"
SUPERLATIVES = ("largest", "longest", "highest", "smallest", "tallest", "oldest", "deepest", "most populous", "busiest")
SUPERLATIVE_RE = re.compile(
    rf"^((?:The )?{NAME})(?:, [^,]{{1,60}},)? (?:is|was) the ((?:second|third)[- ])?({'|'.join(SUPERLATIVES)}) "
    rf"([a-z]+(?: [a-z]+)?) (in|on|of) (?:the (?:U\.S\.|[A-Z][a-z]+) (?:state|province|region) of )?"
    rf"(the world|Earth|the Solar System|(?:the )?{NAME})(?=[,.;]|$)")


@dataclass(frozen=True)
class Fact:
    """One fact read off a summary. detail: what a relation needs besides (subject, value), see extract_facts."""
    relation: str
    subject: str
    value: str
    detail: str = ""

    @property
    def key(self):
        """What identifies the fact for the split: both directions of one fact land in the same split."""
        return f"{self.relation}:{self.subject.lower()}:{self.value.lower()}"


def name_ok(name):
    return 1 <= len(name.split()) <= MAX_NAME_WORDS and not re.search(r"[;:!?\"()]|'s\b", name)


def place_name(name):
    """A place read after "capital of" / "in", cleaned, or None: "Egypt and the Cairo Governorate" -> "Egypt"."""
    name = name.split(" and the ")[0]
    parts = name.split(" and ")
    # "Trinidad and Tobago" is one name; "Roman and Byzantine Empire" is a phrase the pattern misread
    if len(parts) > 2 or (len(parts) == 2 and any(len(part.split()) > 1 for part in parts)) or ADJECTIVE_RE.match(name):
        return None
    return name if name_ok(name) else None


def strip_article(name):
    return re.sub(r"^The ", "", name)


def first_sentence(text):
    return sentences(text.split("\n")[0])[0]


def extract_facts(text):
    """The facts one Wikipedia summary states in its opening, as a list of Fact (often empty)."""
    opening = first_sentence(text)
    facts = []
    # capital, from the city's summary: value = the place whose capital it is
    if match := CAPITAL_RE.match(opening):
        city, place = match.group(1), place_name(match.group(2))
        if name_ok(city) and place and city != place:
            facts.append(Fact("capital", city, place))
    # capital, from the place's own summary ("Its capital and largest city is Kigali")
    subject = summary_subject(text)
    if subject and subject[0] is None and subject[1][:1].isupper() and PLACE_KIND_RE.search(opening):
        place = subject[1]
        for sentence in sentences(text.split("\n")[0])[:8]:
            if (match := OWN_CAPITAL_RE.search(sentence)) and name_ok(match.group(1)) and match.group(1) != place:
                facts.append(Fact("capital", match.group(1), place))
                break
    if match := SYMBOL_RE.match(opening):
        facts.append(Fact("symbol", match.group(1).lower(), match.group(2)))
    if match := PLANET_RE.match(opening):
        facts.append(Fact("planet", match.group(1), match.group(2)))
    if (match := CREATOR_RE.match(opening)) and (match.group(2) != "film" or FILM_NEEDS in opening):
        work, kind, creator = match.groups()
        # "by High Renaissance master Leonardo": a style or period read as the creator's name
        if name_ok(work) and name_ok(creator) and len(creator.split()) >= 2 and creator.split()[-1] not in NOT_A_NATIONALITY:
            facts.append(Fact("creator", work, creator, kind))
    if match := PERSON_RE.match(opening):
        name, verb, nationality, occupation = match.groups()
        nationality = re.sub(r"^Ancient ", "", nationality)
        if (name_ok(name) and nationality not in NOT_A_NATIONALITY and nationality.endswith(DEMONYM_ENDINGS)
                and occupation in OCCUPATIONS and not name.startswith("The ")):
            facts.append(Fact("person", name, nationality, f"{verb} {occupation}"))
    if match := LOCATED_RE.match(opening):
        thing, kind, place = match.groups()
        place = place_name(COMPASS_PREFIX_RE.sub("", place))
        if name_ok(thing) and place and place.lower() not in thing.lower():
            facts.append(Fact("located", thing, place, kind))
    if match := SUPERLATIVE_RE.match(opening):
        thing, rank, superlative, noun, preposition, place = match.groups()
        # "the most populous city in the U.S.": the pattern stops at the first period, leaving a one-letter "U"
        if (name_ok(thing) and not noun.startswith(("and ", "of ")) and noun.split()[-1] not in ("and", "of", "by")
                and len(place.split()[-1]) > 1 and " and " not in place):
            descriptor = f"the {rank or ''}{superlative} {noun} {preposition} {place}"
            facts.append(Fact("superlative", thing, descriptor))
    return facts


@functools.lru_cache(maxsize=None)
def corpus_facts(file_name="train"):
    """Every fact of one sample file, deduplicated, conflicts dropped, in a stable order (a tuple: it is cached)."""
    by_key, capitals = {}, {}
    for text in sample_documents(file_name):
        if document_source(text) != "wikipedia":
            continue
        for fact in extract_facts(text):
            by_key.setdefault(fact.key, fact)
            if fact.relation == "capital":
                capitals.setdefault(fact.value.lower(), set()).add(fact.subject.lower())
    # a place read with two different capitals (a misreading, or a capital that moved): neither is asked
    disputed = {place for place, cities in capitals.items() if len(cities) > 1}
    facts = [fact for fact in by_key.values() if not (fact.relation == "capital" and fact.value.lower() in disputed)]
    return tuple(sorted(facts, key=lambda fact: fact.key))


def fact_split(fact):
    """'train' or 'test', from a hash of the fact: stable, and the same for both of its directions."""
    return "test" if zlib.crc32(fact.key.encode()) % TEST_FRACTION == 0 else "train"


# ---------------------------------------------------------------------------------------------- asking them

# Per question kind: the train phrasings, the held-out test phrasings (never used in training) and the reply.
# dev/eval_facts.py has a third, hand-written set, distinct from both.
TRAIN_TEMPLATES = {
    "capital": ["Which city is the capital of {place}?", "Name the capital city of {place}.",
                "{place} has which city as its capital?", "Which city serves as the capital of {place}?"],
    "capital_reverse": ["{city} is the capital of which country or region?", "Of which country or region is {city} the capital?",
                        "Which place has {city} as its capital?"],
    "symbol": ["Which chemical symbol stands for {element}?", "Give the chemical symbol of {element}.",
               "How is {element} written in chemical formulas?"],
    "symbol_reverse": ["Which element has the chemical symbol {symbol}?", "The symbol {symbol} stands for which chemical element?",
                       "Name the element whose symbol is {symbol}."],
    "planet": ["Counting from the Sun, where is {planet} among the planets?", "{planet} is which planet from the Sun?"],
    "planet_reverse": ["Which planet is {ordinal} from the Sun?", "Name the {ordinal} planet from the Sun."],
    "creator": ["Who {verb} {work}?", "Name the person who {verb} {work}.", "{work} is a {kind} by whom?"],
    "creator_reverse": ["Name a {kind} by {creator}.", "Which {kind} did {creator} create?"],
    "nationality": ["What nationality {be} {person}?", "{person} {be} of which nationality?"],
    "occupation": ["What {be} {person}'s profession?", "What did {person} do for a living?", "What kind of work did {person} do?"],
    "located": ["Where is {thing} located?", "In which part of the world is {thing}?"],
    "superlative": ["Which {noun} is the {superlative_phrase}?", "Name the {descriptor_no_article}."],
    "superlative_reverse": ["What is special about {thing}?", "Why is {thing} notable?"],
}
TEST_TEMPLATES = {
    "capital": ["Tell me which city is {place}'s capital.", "Do you know the capital city of {place}?"],
    "capital_reverse": ["Which country or region is governed from {city}?"],
    "symbol": ["What letters are used as the symbol of {element}?"],
    "symbol_reverse": ["{symbol} is the symbol of which element?"],
    "planet": ["In order from the Sun, which planet is {planet}?"],
    "planet_reverse": ["What is the {ordinal} planet out from the Sun?"],
    "creator": ["Do you know who {verb} {work}?", "{work} was made by whom?"],
    "creator_reverse": ["Can you name a {kind} by {creator}?"],
    "nationality": ["Which nationality did {person} have?"],
    "occupation": ["What was {person} known for doing professionally?"],
    "located": ["Where in the world would you find {thing}?"],
    "superlative": ["Do you know the {descriptor_no_article}?"],
    "superlative_reverse": ["Is there anything notable about {thing}?"],
}


def article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


def question_kinds(fact):
    """[(kind, template fields, reply, accepted answers)] for each direction the fact's relation is asked in."""
    relation, subject, value, detail = fact.relation, fact.subject, fact.value, fact.detail
    if relation == "capital":
        fields = {"city": subject, "place": value}
        return [("capital", fields, f"The capital of {value} is {subject}.", [subject]),
                ("capital_reverse", fields, f"{subject} is the capital of {value}.", [value])]
    if relation == "symbol":
        fields = {"element": subject, "symbol": value}
        return [("symbol", fields, f"The chemical symbol of {subject} is {value}.", [value]),
                ("symbol_reverse", fields, f"{value} is the chemical symbol of {subject}.", [subject])]
    if relation == "planet":
        fields = {"planet": subject, "ordinal": value}
        reply = f"{subject} is the {value} planet from the Sun."
        return [("planet", fields, reply, [value]), ("planet_reverse", fields, reply, [subject])]
    if relation == "creator":
        verb = WORK_KINDS[detail]
        fields = {"work": subject, "creator": value, "kind": detail, "verb": verb}
        return [("creator", fields, f"{subject} is {article(detail)} {detail} by {value}.", [value]),
                ("creator_reverse", fields, f"{value} {verb} {subject}.", [subject])]
    if relation == "person":
        be, occupation = detail.split()
        fields = {"person": subject, "be": be}
        reply = f"{subject} {be} {article(value)} {value} {occupation}."
        return [("nationality", fields, reply, [value]), ("occupation", fields, reply, [occupation])]
    if relation == "located":
        fields = {"thing": subject, "place": value}
        return [("located", fields, f"{subject} is {article(detail)} {detail} in {value}.", [value])]
    if relation == "superlative":
        descriptor = value  # "the largest city in Turkey"
        words = descriptor.split()
        # "the largest city in Turkey" -> noun "city", phrase "largest in Turkey"; "the second-largest island in the world"
        noun_end = next(i for i, word in enumerate(words) if word in ("in", "on", "of"))
        noun = words[noun_end - 1]
        fields = {"thing": strip_article(subject), "noun": noun, "descriptor_no_article": descriptor[len("the "):],
                  "superlative_phrase": " ".join(words[1:noun_end - 1] + words[noun_end:])}
        return [("superlative", fields, f"{subject} is {descriptor}.", [strip_article(subject)]),
                ("superlative_reverse", fields, f"{subject} is {descriptor}.", [" ".join(words[1:noun_end])])]
    raise ValueError(f"unknown relation {relation!r}")


def words_of(text):
    return re.findall(r"\w+", text.lower())


def answered_by(reply, answers):
    """True when every word of one of the accepted answers appears among the reply's words."""
    reply_words = set(words_of(reply))
    return any(set(words_of(answer)) <= reply_words for answer in answers)


def fill(template, fields):
    question = template.format(**fields)
    return question[0].upper() + question[1:]


def questions_for(facts, templates, phrasings, seed):
    """(question, reply, answers, relation, kind) for each fact and direction, in up to `phrasings` of the templates."""
    questions = []
    for fact in facts:
        for kind, fields, reply, answers in question_kinds(fact):
            rng = random.Random(f"{seed}:{fact.key}:{kind}")  # the same phrasings on every run and rank
            chosen = rng.sample(templates[kind], min(phrasings, len(templates[kind])))
            for template in chosen:
                question = fill(template, fields)
                if answered_by(question, answers):  # the answer is in the question itself: echoing it would pass
                    continue
                questions.append((question, reply, tuple(answers), fact.relation, kind))
    return questions


@functools.lru_cache(maxsize=None)
def split_questions(split, phrasings):
    facts = [fact for fact in corpus_facts("train") if fact_split(fact) == split]
    templates = TRAIN_TEMPLATES if split == "train" else TEST_TEMPLATES
    questions = questions_for(facts, templates, phrasings, seed=f"factqa:{split}")
    random.Random(f"factqa:{split}:order").shuffle(questions)  # mixed relations, so stop=N is a fair sample
    return tuple(questions)


class FactQA(Task):
    """
    Short factual questions in both directions (see the module doc). phrasings: how many of the split's
    templates each fact and direction is asked in (train has 2-4 per direction, test 1-2).
    """

    def __init__(self, split="train", phrasings=2, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"FactQA split must be train or test, got {split!r}")
        self.split = split
        self.questions = split_questions(split, phrasings)

    eval_type = "generative"

    def num_examples(self):
        return len(self.questions)

    def get_example(self, index):
        question, reply, answers, relation, kind = self.questions[index]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return {"messages": messages, "answers": list(answers), "relation": relation, "kind": kind}

    def evaluate(self, conversation, assistant_response):
        """1 if every word of one accepted answer appears in the reply (see the module doc)."""
        return int(answered_by(assistant_response, conversation["answers"]))
