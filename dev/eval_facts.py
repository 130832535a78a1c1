"""
Does the chat model know what it read? Short factual questions, written by hand, about facts the embedded
sample corpus states in its train file (Wikipedia lead summaries), scored by exact answer words.

    python -m dev.eval_facts                    # the latest SFT model (NANOCHAT_DATA=sample runs)
    python -m dev.eval_facts -i rl --show 5

Why by hand: tasks/factqa.py builds its questions from templates, and a model drilled on those templates
could score on a test in the same phrasings by pattern alone. Every question below is written out in its
own words, in forms no template uses (tests/test_factqa.py checks that none equals a question any
template can produce), so the score says whether the model can answer a fact in a phrasing it was never
trained on.

Each question names the fact it asks about (relation, subject, value as tasks/factqa.py reads it from the
corpus). Two groups are scored apart:
    drilled:   facts in FactQA's train split: the model read them in pretraining and was also asked about
               them in mid/SFT, in other words (the templates), so this measures recall across phrasings
    only read: facts FactQA holds out: the model saw them in pretraining only, so this measures whether
               pretraining alone put the fact where a question can reach it
A reply is right when every word of one accepted answer appears in it ("Paris" in "The capital of France
is Paris."), the same rule as FactQA.evaluate. Greedy decoding: the score does not move between runs.
"""
import argparse
import time

import torch

from nanochat.common import COMPUTE_DTYPES, autocast_context, compute_init, get_compute_dtype, print0
from tasks.factqa import answered_by, corpus_facts, fact_split

# (question, accepted answers, (relation, subject, value) of the corpus fact it asks about)
QUESTIONS = [
    # capitals, both ways
    ("What is the capital of France?", ["Paris"], ("capital", "Paris", "France")),
    ("What's the capital city of Spain?", ["Madrid"], ("capital", "Madrid", "Spain")),
    ("Russia's capital is what city?", ["Moscow"], ("capital", "Moscow", "Russia")),
    ("What city is Peru's capital?", ["Lima"], ("capital", "Lima", "Peru")),
    ("The capital of Norway is called what?", ["Oslo"], ("capital", "Oslo", "Norway")),
    ("What is Canada's capital?", ["Ottawa"], ("capital", "Ottawa", "Canada")),
    ("Where is the capital of Portugal?", ["Lisbon"], ("capital", "Lisbon", "Portugal")),
    ("What is the capital of Sweden called?", ["Stockholm"], ("capital", "Stockholm", "Sweden")),
    ("Poland's capital city is?", ["Warsaw"], ("capital", "Warsaw", "Poland")),
    ("What is the capital of Argentina?", ["Buenos Aires"], ("capital", "Buenos Aires", "Argentina")),
    ("Tell me Hungary's capital.", ["Budapest"], ("capital", "Budapest", "Hungary")),
    ("What is the capital of Kenya?", ["Nairobi"], ("capital", "Nairobi", "Kenya")),
    ("What city is the seat of government of Iran?", ["Tehran"], ("capital", "Tehran", "Iran")),
    ("Vietnam's capital is which city?", ["Hanoi"], ("capital", "Hanoi", "Vietnam")),
    ("Seoul is the capital of what country?", ["Korea"], ("capital", "Seoul", "South Korea")),
    ("Which country's capital is Ottawa?", ["Canada"], ("capital", "Ottawa", "Canada")),
    ("Lisbon is the capital of what?", ["Portugal"], ("capital", "Lisbon", "Portugal")),
    ("What country is Baghdad the capital of?", ["Iraq"], ("capital", "Baghdad", "Iraq")),
    ("Warsaw is the capital city of which nation?", ["Poland"], ("capital", "Warsaw", "Poland")),
    ("What is the capital of Germany?", ["Berlin"], ("capital", "Berlin", "Germany")),
    ("What is Japan's capital city?", ["Tokyo"], ("capital", "Tokyo", "Japan")),
    ("What is the capital of Egypt?", ["Cairo"], ("capital", "Cairo", "Egypt")),
    ("Athens is the capital of what country?", ["Greece"], ("capital", "Athens", "Greece")),
    ("What's the capital of Ireland?", ["Dublin"], ("capital", "Dublin", "Ireland")),
    # chemical symbols
    ("What is the chemical symbol for gold?", ["Au"], ("symbol", "gold", "Au")),
    ("What symbol does carbon have on the periodic table?", ["C"], ("symbol", "carbon", "C")),
    ("What is lead's chemical symbol?", ["Pb"], ("symbol", "lead", "Pb")),
    ("What is the symbol for helium?", ["He"], ("symbol", "helium", "He")),
    ("Which symbol is used for mercury?", ["Hg"], ("symbol", "mercury", "Hg")),
    ("What's the symbol of copper?", ["Cu"], ("symbol", "copper", "Cu")),
    ("What is the chemical symbol of tin?", ["Sn"], ("symbol", "tin", "Sn")),
    ("Au is the symbol for what element?", ["gold"], ("symbol", "gold", "Au")),
    ("What element does the symbol Pb represent?", ["lead"], ("symbol", "lead", "Pb")),
    ("What element has the symbol Ne?", ["neon"], ("symbol", "neon", "Ne")),
    ("The element with symbol K is what?", ["potassium"], ("symbol", "potassium", "K")),
    ("What is the chemical symbol for iron?", ["Fe"], ("symbol", "iron", "Fe")),
    ("What is nickel's chemical symbol?", ["Ni"], ("symbol", "nickel", "Ni")),
    # planets
    ("What is the fourth planet from the Sun?", ["Mars"], ("planet", "Mars", "fourth")),
    ("Which planet comes second from the Sun?", ["Venus"], ("planet", "Venus", "second")),
    ("What planet is closest to the Sun?", ["Mercury"], ("planet", "Mercury", "first")),
    ("How far from the Sun is Jupiter in planet order?", ["fifth", "5th"], ("planet", "Jupiter", "fifth")),
    ("What is Uranus's position among the planets from the Sun?", ["seventh", "7th"], ("planet", "Uranus", "seventh")),
    # who made what, both ways
    ("Who is the author of Pride and Prejudice?", ["Austen"], ("creator", "Pride and Prejudice", "Jane Austen")),
    ("Who wrote the novel War and Peace?", ["Tolstoy"], ("creator", "War and Peace", "Leo Tolstoy")),
    ("Who is the author of Nineteen Eighty-Four?", ["Orwell"], ("creator", "Nineteen Eighty-Four", "George Orwell")),
    ("Don Quixote was written by which author?", ["Cervantes"], ("creator", "Don Quixote", "Miguel de Cervantes")),
    ("Who was the painter of the Mona Lisa?", ["Leonardo"], ("creator", "The Mona Lisa", "Leonardo da Vinci")),
    ("Which artist painted Guernica?", ["Picasso"], ("creator", "Guernica", "Pablo Picasso")),
    ("Which composer wrote the opera The Magic Flute?", ["Mozart"], ("creator", "The Magic Flute", "Wolfgang Amadeus Mozart")),
    ("Which writer gave us Crime and Punishment?", ["Dostoevsky"], ("creator", "Crime and Punishment", "Fyodor Dostoevsky")),
    ("Who is the author of The Divine Comedy?", ["Dante"], ("creator", "The Divine Comedy", "Dante Alighieri")),
    ("Who is the author of Robinson Crusoe?", ["Defoe"], ("creator", "Robinson Crusoe", "Daniel Defoe")),
    ("Who composed the music of The Nutcracker?", ["Tchaikovsky"], ("creator", "The Nutcracker", "Pyotr Ilyich Tchaikovsky")),
    ("What novel did George Orwell write?", ["Nineteen Eighty-Four"], ("creator", "Nineteen Eighty-Four", "George Orwell")),
    ("What famous novel is Jane Austen known for?", ["Pride and Prejudice"], ("creator", "Pride and Prejudice", "Jane Austen")),
    ("Who was the author of Dracula?", ["Stoker"], ("creator", "Dracula", "Bram Stoker")),
    ("Who is the author of Les Misérables?", ["Hugo"], ("creator", "Les Misérables", "Victor Hugo")),
    # people: nationality and occupation
    ("What nationality was Charles Darwin?", ["English", "British"], ("person", "Charles Robert Darwin", "English")),
    ("Where was Frédéric Chopin from?", ["Polish", "Poland"], ("person", "Frédéric François Chopin", "Polish")),
    ("What was Immanuel Kant's nationality?", ["German", "Germany"], ("person", "Immanuel Kant", "German")),
    ("What country was Louis Pasteur from?", ["French", "France"], ("person", "Louis Pasteur", "French")),
    ("Which country did Tchaikovsky come from?", ["Russian", "Russia"], ("person", "Pyotr Ilyich Tchaikovsky", "Russian")),
    ("What was Claude Monet's job?", ["painter", "artist"], ("person", "Oscar-Claude Monet", "French")),
    ("What did Friedrich Nietzsche do?", ["philosopher", "philosophy"], ("person", "Friedrich Wilhelm Nietzsche", "German")),
    ("What was Dmitri Mendeleev's profession?", ["chemist", "chemistry"], ("person", "Dmitri Ivanovich Mendeleev", "Russian")),
    ("What nationality was Beethoven?", ["German", "Germany"], ("person", "Ludwig van Beethoven", "German")),
    # superlatives and places
    ("What is the largest city in Turkey?", ["Istanbul"], ("superlative", "Istanbul", "the largest city in Turkey")),
    ("Which city has the most people in Scotland?", ["Glasgow"], ("superlative", "Glasgow", "the most populous city in Scotland")),
    ("What is the highest mountain in North America?", ["Denali"],
     ("superlative", "Denali", "the highest mountain peak in North America")),
    ("What is the largest city in Alberta?", ["Calgary"], ("superlative", "Calgary", "the largest city in Alberta")),
    ("In what country is the city of Lyon?", ["France"], ("located", "Lyon", "France")),
    ("Which country is Timbuktu in?", ["Mali"], ("located", "Timbuktu", "Mali")),
    ("On which continent is Canada?", ["North America"], ("located", "Canada", "North America")),
    ("In which country is Lagos?", ["Nigeria"], ("located", "Lagos", "Nigeria")),
]


def fact_groups():
    """{question: 'drilled' or 'only read'}; raises when a question's fact is not one the corpus' train file states."""
    facts = {(fact.relation, fact.subject, fact.value): fact for fact in corpus_facts("train")}
    groups = {}
    for question, _, fact_id in QUESTIONS:
        if fact_id not in facts:
            raise ValueError(f"{question!r} asks about {fact_id}, which tasks/factqa.py does not read from the train file")
        groups[question] = "drilled" if fact_split(facts[fact_id]) == "train" else "only read"
    return groups


def main():
    parser = argparse.ArgumentParser(description="Ask the chat model hand-written factual questions about its corpus; exact-answer score")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag, e.g. d4 (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length limit (the answers are one short sentence)")
    parser.add_argument("--show", type=int, default=3, help="sample answers to print (the first one is always the France question)")
    parser.add_argument("--device-type", type=str, default=None, help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES, help="matmul dtype (as in chat_eval)")
    args = parser.parse_args()

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    groups = fact_groups()
    _, _, _, _, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the {args.source} model: {e}")
    engine = Engine(model, tokenizer)
    autocast = autocast_context(device, get_compute_dtype(device, args.dtype))

    started, replies, right = time.time(), [], {"drilled": [0, 0], "only read": [0, 0]}
    for question, answers, _ in QUESTIONS:
        prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": question},
                                                               {"role": "assistant", "content": ""}]})
        with autocast, torch.no_grad():
            results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=args.max_new_tokens, temperature=0.0)
        reply = tokenizer.decode(results[0][len(prompt):]).strip()
        correct = answered_by(reply, answers)
        replies.append((question, reply, correct))
        right[groups[question]][0] += int(correct)
        right[groups[question]][1] += 1

    passed = sum(count for count, _ in right.values())
    print0(f"{args.source} step {meta.get('step')}: {passed}/{len(QUESTIONS)} = {100 * passed / len(QUESTIONS):.1f}% of the "
           f"hand-written factual questions ({time.time() - started:.0f} s)")
    for group, (count, total) in right.items():
        print0(f"  {group}: {count}/{total} = {100 * count / max(total, 1):.1f}%")
    for question, reply, correct in replies[:max(args.show, 1)]:
        print0(f"  {'right' if correct else 'wrong'}: {question!r} -> {reply!r}")


if __name__ == "__main__":
    main()
