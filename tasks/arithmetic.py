"""
Arithmetic: synthetic grade-school word problems in GSM8K's exact format, an offline stand-in for
GSM8K (which lives on the Hugging Face hub).

Each problem is one of a dozen and a half templates (shopping, change, sharing, rates, distances,
ages, savings...) that take 1 to 3 steps of + - * / with small operands (mostly 1-100) and integer
results. The worked solution carries GSM8K's calculator annotations ("48/2 = <<48/2=24>>24") and
ends with a line "#### 24"; like GSM8K, the annotations become python tool calls, so a model
trained on these learns the same calculator habit, and the same answer checker grades it.

The problems are generated here, so there is no licence to honour. A problem belongs to the test
split when the crc32 of its question text is 0 mod 10, so no question text is in both splits.
"""
import operator
import random
import zlib

from tasks.common import Task
from tasks.gsm8k import evaluate_final_answer, solution_to_parts

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
PEOPLE = [
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Lucas", "he"), ("Zoe", "she"), ("Ethan", "he"), ("Priya", "she"), ("Kenji", "he"),
    ("Grace", "she"), ("Mateo", "he"), ("Lily", "she"), ("Jamal", "he"), ("Hannah", "she"), ("Leo", "he"),
]
PRODUCTS = ["pencils", "notebooks", "apples", "cupcakes", "stickers", "toy cars", "bottles of juice",
            "comic books", "oranges", "candles", "muffins", "balloons", "erasers", "packs of cards"]
COLLECTIBLES = ["marbles", "stickers", "seashells", "stamps", "trading cards", "beads", "coins", "pebbles"]
MACHINES = [("machine", "bottles"), ("bakery", "loaves of bread"), ("printer", "pages"), ("factory", "toys"),
            ("robot", "boxes"), ("farm", "eggs")]
VEHICLES = ["car", "train", "bus", "truck", "boat", "cyclist"]
OBJECTS = ["pencils", "cookies", "crayons", "eggs", "light bulbs", "cups", "plates", "apples"]
TREATS = ["cookies", "brownies", "cupcakes", "muffins", "pancakes"]
EVENTS = ["zoo", "museum", "circus", "aquarium", "movie", "concert"]
GOALS = ["bike", "video game", "guitar", "skateboard", "tablet", "pair of shoes"]


def calculation(*terms):
    """
    A GSM8K calculator annotation for terms like (48, "/", 2): ("48/2 = <<48/2=24>>24", 24).
    Terms are applied left to right, so a chain must not mix + - with * / (no precedence here).
    """
    value = terms[0]
    for symbol, operand in zip(terms[1::2], terms[2::2]):
        value = OPERATIONS[symbol](value, operand)
    if value != int(value) or value < 0:
        raise ValueError(f"{terms} does not give a non-negative integer")  # a template bug, not bad luck
    value = int(value)
    expression = "".join(str(term) for term in terms)
    return f"{expression} = <<{expression}={value}>>{value}", value


def person(rng):
    name, pronoun = rng.choice(PEOPLE)
    return name, pronoun, {"she": "her", "he": "him"}[pronoun]


# ---------------------------------------------------------------------------- templates
# Each takes a random.Random and returns (question, solution lines without the final "#### N", answer).


def shopping_total(rng):
    name, pronoun, _ = person(rng)
    count, price, product = rng.randint(2, 12), rng.randint(2, 15), rng.choice(PRODUCTS)
    question = f"{name} buys {count} {product} for ${price} each. How much money does {pronoun} spend?"
    text, total = calculation(count, "*", price)
    return question, [f"{name} spends {text} dollars on {product}."], total


def shopping_change(rng):
    name, pronoun, _ = person(rng)
    count, price, product = rng.randint(2, 9), rng.randint(2, 10), rng.choice(PRODUCTS)
    money = count * price + rng.randint(1, 30)
    question = (f"{name} has ${money}. {pronoun.capitalize()} buys {count} {product} that cost ${price} each. "
                f"How much money does {pronoun} have left?")
    cost_text, cost = calculation(count, "*", price)
    left_text, left = calculation(money, "-", cost)
    return question, [f"The {product} cost {cost_text} dollars.", f"{name} has {left_text} dollars left."], left


def shopping_two_products(rng):
    name, pronoun, _ = person(rng)
    first, second = rng.sample(PRODUCTS, 2)
    count1, price1, count2, price2 = rng.randint(2, 8), rng.randint(1, 12), rng.randint(2, 8), rng.randint(1, 12)
    question = (f"{name} buys {count1} {first} at ${price1} each and {count2} {second} at ${price2} each. "
                f"How much does {pronoun} pay altogether?")
    text1, cost1 = calculation(count1, "*", price1)
    text2, cost2 = calculation(count2, "*", price2)
    total_text, total = calculation(cost1, "+", cost2)
    lines = [f"The {first} cost {text1} dollars.", f"The {second} cost {text2} dollars.",
             f"Altogether {pronoun} pays {total_text} dollars."]
    return question, lines, total


def equal_sharing(rng):
    name, _, _ = person(rng)
    friends, each, things = rng.randint(2, 10), rng.randint(2, 12), rng.choice(COLLECTIBLES)
    total = friends * each  # built from the quotient so that the division comes out even
    question = (f"{name} has {total} {things} and shares them equally among {friends} friends. "
                f"How many {things} does each friend get?")
    text, share = calculation(total, "/", friends)
    return question, [f"Each friend gets {text} {things}."], share


def sharing_after_keeping(rng):
    name, pronoun, object_pronoun = person(rng)
    neighbors, each, kept, treats = rng.randint(2, 8), rng.randint(2, 10), rng.randint(1, 12), rng.choice(TREATS)
    baked = neighbors * each + kept
    question = (f"{name} baked {baked} {treats} and kept {kept} for {object_pronoun}self. "
                f"{pronoun.capitalize()} gave the rest equally to {neighbors} neighbors. How many {treats} did each neighbor get?")
    rest_text, rest = calculation(baked, "-", kept)
    share_text, share = calculation(rest, "/", neighbors)
    lines = [f"{name} gave away {rest_text} {treats}.", f"Each neighbor got {share_text} {treats}."]
    return question, lines, share


def production_rate(rng):
    machine, products = rng.choice(MACHINES)
    rate, hours = rng.randint(3, 60), rng.randint(2, 10)
    question = f"A {machine} makes {rate} {products} every hour. How many {products} does it make in {hours} hours?"
    text, total = calculation(rate, "*", hours)
    return question, [f"In {hours} hours it makes {text} {products}."], total


def weekly_wage(rng):
    name, pronoun, _ = person(rng)
    hours, days, wage = rng.randint(2, 8), rng.randint(2, 6), rng.randint(5, 20)
    question = (f"{name} works {hours} hours a day for {days} days a week and earns ${wage} an hour. "
                f"How much does {pronoun} earn in a week?")
    hours_text, weekly_hours = calculation(hours, "*", days)
    pay_text, pay = calculation(weekly_hours, "*", wage)
    lines = [f"{name} works {hours_text} hours a week.", f"{pronoun.capitalize()} earns {pay_text} dollars a week."]
    return question, lines, pay


def travel_distance(rng):
    vehicle, speed, hours = rng.choice(VEHICLES), rng.randint(5, 80), rng.randint(2, 9)
    question = f"A {vehicle} travels at {speed} miles per hour. How many miles does it travel in {hours} hours?"
    text, distance = calculation(speed, "*", hours)
    return question, [f"It travels {text} miles."], distance


def travel_time(rng):
    vehicle, speed, hours = rng.choice(VEHICLES), rng.randint(5, 60), rng.randint(2, 9)
    distance = speed * hours
    question = f"A {vehicle} travels at {speed} miles per hour. How many hours does it take to travel {distance} miles?"
    text, time = calculation(distance, "/", speed)
    return question, [f"It takes {text} hours."], time


def found_and_lost(rng):
    name, pronoun, _ = person(rng)
    things = rng.choice(COLLECTIBLES)
    had, found = rng.randint(5, 60), rng.randint(2, 40)
    lost = rng.randint(1, had + found)
    question = (f"{name} had {had} {things}. {pronoun.capitalize()} found {found} more and then lost {lost}. "
                f"How many {things} does {pronoun} have now?")
    found_text, after_finding = calculation(had, "+", found)
    lost_text, now = calculation(after_finding, "-", lost)
    lines = [f"After finding more, {name} had {found_text} {things}.", f"After losing some, {pronoun} has {lost_text} {things}."]
    return question, lines, now


def half_as_many(rng):
    name, pronoun, _ = person(rng)
    monday, fruit = 2 * rng.randint(3, 40), rng.choice(["apples", "strawberries", "cherries", "plums"])
    question = (f"{name} picked {monday} {fruit} on Monday and half as many on Tuesday. "
                f"How many {fruit} did {pronoun} pick in total?")
    half_text, tuesday = calculation(monday, "/", 2)
    total_text, total = calculation(monday, "+", tuesday)
    lines = [f"On Tuesday {pronoun} picked {half_text} {fruit}.", f"In total {pronoun} picked {total_text} {fruit}."]
    return question, lines, total


def times_as_many(rng):
    (first, _), (second, _) = rng.sample(PEOPLE, 2)
    count, factor, things = rng.randint(2, 30), rng.randint(2, 5), rng.choice(COLLECTIBLES)
    question = (f"{first} has {count} {things}. {second} has {factor} times as many {things} as {first}. "
                f"How many {things} do they have together?")
    times_text, second_count = calculation(count, "*", factor)
    total_text, total = calculation(count, "+", second_count)
    lines = [f"{second} has {times_text} {things}.", f"Together they have {total_text} {things}."]
    return question, lines, total


def reading_days(rng):
    name, _, object_pronoun = person(rng)
    per_day, days = rng.randint(5, 30), rng.randint(2, 12)
    pages = per_day * days
    question = (f"A book has {pages} pages. {name} reads {per_day} pages every day. "
                f"How many days will it take {object_pronoun} to finish the book?")
    text, answer = calculation(pages, "/", per_day)
    return question, [f"It will take {object_pronoun} {text} days."], answer


def saving_weeks(rng):
    name, pronoun, object_pronoun = person(rng)
    weekly, weeks, goal = rng.randint(2, 20), rng.randint(2, 10), rng.choice(GOALS)
    have = rng.randint(0, 60)
    price = have + weekly * weeks
    question = (f"{name} wants to buy a {goal} that costs ${price}. {pronoun.capitalize()} already has ${have} and saves ${weekly} each week. "
                f"How many weeks will it take {object_pronoun} to have enough money?")
    need_text, need = calculation(price, "-", have)
    weeks_text, answer = calculation(need, "/", weekly)
    lines = [f"{name} still needs {need_text} dollars.", f"It will take {weeks_text} weeks."]
    return question, lines, answer


def boxes_with_broken(rng):
    boxes, per_box, things = rng.randint(2, 12), rng.randint(3, 12), rng.choice(OBJECTS)
    broken = rng.randint(1, boxes * per_box - 1)
    question = (f"There are {boxes} boxes with {per_box} {things} in each box. {broken} of the {things} are broken. "
                f"How many {things} are not broken?")
    total_text, total = calculation(boxes, "*", per_box)
    good_text, good = calculation(total, "-", broken)
    lines = [f"There are {total_text} {things} in all.", f"{good_text} of them are not broken."]
    return question, lines, good


def future_age(rng):
    (first, _), (second, _) = rng.sample(PEOPLE, 2)
    age, older, years = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 15)
    question = (f"{first} is {age} years old. {second} is {older} years older than {first}. "
                f"How old will {second} be in {years} years?")
    now_text, now = calculation(age, "+", older)
    later_text, later = calculation(now, "+", years)
    lines = [f"{second} is {now_text} years old now.", f"In {years} years {second} will be {later_text} years old."]
    return question, lines, later


def group_tickets(rng):
    event = rng.choice(EVENTS)
    adult, child = rng.randint(6, 20), rng.randint(2, 10)
    adults, children = rng.randint(1, 5), rng.randint(1, 8)
    question = (f"Tickets to the {event} cost ${adult} for adults and ${child} for children. "
                f"How much do {adults} adults and {children} children pay in total?")
    adults_text, adults_cost = calculation(adults, "*", adult)
    children_text, children_cost = calculation(children, "*", child)
    total_text, total = calculation(adults_cost, "+", children_cost)
    lines = [f"The adult tickets cost {adults_text} dollars.", f"The children's tickets cost {children_text} dollars.",
             f"In total they pay {total_text} dollars."]
    return question, lines, total


def fraction_of_class(rng):
    parts, fraction = rng.choice([(2, "half"), (3, "a third"), (4, "a quarter"), (5, "a fifth")])
    students = parts * rng.randint(3, 10)
    question = (f"A class has {students} students and {fraction} of them walk to school. "
                f"How many students do not walk to school?")
    walk_text, walkers = calculation(students, "/", parts)
    rest_text, rest = calculation(students, "-", walkers)
    lines = [f"{walk_text} students walk to school.", f"{rest_text} students do not walk to school."]
    return question, lines, rest


TEMPLATES = [shopping_total, shopping_change, shopping_two_products, equal_sharing, sharing_after_keeping,
             production_rate, weekly_wage, travel_distance, travel_time, found_and_lost, half_as_many,
             times_as_many, reading_days, saving_weeks, boxes_with_broken, future_age, group_tickets,
             fraction_of_class]


def in_test_split(question):
    return zlib.crc32(question.encode("utf-8")) % 10 == 0


def generate_problem(split, index):
    """(question, GSM8K-style answer text) of problem `index` of `split`: the same on every run and rank."""
    for attempt in range(1000):
        rng = random.Random(f"arithmetic:{split}:{index}:{attempt}")  # str seeds are hashed stably, unlike hash()
        question, lines, answer = rng.choice(TEMPLATES)(rng)
        # a problem whose question text hashes to the other split is skipped, so the splits never share a question
        if in_test_split(question) == (split == "test"):
            return question, "\n".join(lines + [f"#### {answer}"])
    raise RuntimeError(f"no {split} problem found for index {index}")  # 0.9**1000 odds for test: never in practice


class Arithmetic(Task):

    def __init__(self, split="train", size=1000, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"Arithmetic split must be train or test, got {split!r}")
        self.split, self.size = split, size

    eval_type = "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        question, answer = generate_problem(self.split, index)
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": solution_to_parts(answer)},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return evaluate_final_answer(conversation, assistant_response)
