"""Generate the meeting-json demo dataset for tunesmith.

Each row asks the model to turn a natural-English meeting request into one
line of calendar-event JSON. Run from the repository root:

    python examples/meeting-json/make_data.py

Standard library only; the fixed seed makes the output identical every run.
"""

import json
import random
from pathlib import Path

SEED = 20240611
OUT_DIR = Path(__file__).resolve().parent
INSTRUCTION = "Turn this meeting request into a calendar event JSON."
SPLITS = {"train": 320, "validation": 40, "heldout": 12}

TITLES = [
    "budget review", "sprint planning", "design critique", "roadmap sync",
    "onboarding session", "customer feedback review", "hiring debrief",
    "marketing standup", "vendor call", "security walkthrough", "product demo",
    "team retrospective", "board prep", "launch checklist review",
    "pricing discussion", "data pipeline sync", "user research readout",
    "content calendar planning", "incident postmortem", "team lunch",
    "interview panel", "performance review", "contract negotiation",
    "brand workshop", "interface design review", "support escalation review",
    "release planning", "offsite planning", "grant proposal review",
    "newsletter brainstorm", "inventory check", "sales pipeline review",
    "partnership kickoff", "training session", "accessibility review",
    "mobile app sync", "investor update", "legal check-in", "mentoring chat",
    "hackathon kickoff", "office move planning", "website redesign review",
    "analytics deep dive", "budget forecast", "customer onboarding call",
    "code review session", "quarterly business review", "recruiting sync",
    "infrastructure cost review", "event logistics meeting",
    "translation review", "community call", "procurement review",
    "roadmap brainstorm", "compliance training", "volunteer coordination",
    "podcast planning", "research seminar", "book club", "holiday party planning",
]

NAMES = [
    "Aisha", "Ben", "Chen", "Diego", "Elena", "Fatima", "Gabriel", "Hana",
    "Ibrahim", "Jasmine", "Kenji", "Lucia", "Mateo", "Nadia", "Olu", "Priya",
    "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wei", "Ximena",
    "Yusuf", "Zara", "Amara", "Björn", "Carmen", "Dmitri", "Esi", "Farid",
    "Grace", "Hiroshi", "Ines", "Jamal", "Kavya", "Liam", "Mei", "Nikos",
    "Oksana", "Pablo", "Rahul", "Sakura", "Tomas", "Valentina", "Wanjiru",
    "Yara", "Zoltan", "Ada", "Bongani", "Chloé", "Dara", "Emeka", "Freya",
    "Gustavo", "Hamid", "Ingrid", "Joon", "Kofi", "Leila", "Marco", "Nia",
    "Omar", "Pia", "Rania", "Santiago", "Thandiwe", "Vikram", "Aroha",
    "Bilal", "Camille", "Deepa", "Erik", "Femi", "Giulia", "José", "Jonas",
    "Keanu", "Noor", "Oscar", "Siobhan", "Søren", "Tendai", "Yuki", "Zoë",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAY_WEIGHTS = [6, 6, 6, 6, 6, 1, 1]  # weekends are rarer but present

# (value written into the JSON, ways to say "at/in/on <place>")
LOCATIONS = [
    ("Zoom", ["on Zoom", "over Zoom", "via Zoom"]),
    ("Google Meet", ["on Google Meet", "over Google Meet"]),
    ("Teams", ["on Teams", "over Teams"]),
    ("Room 4B", ["in Room 4B"]),
    ("Room 101", ["in Room 101"]),
    ("Conference Room 2", ["in Conference Room 2"]),
    ("the Orchid room", ["in the Orchid room"]),
    ("the Maple room", ["in the Maple room"]),
    ("the main boardroom", ["in the main boardroom"]),
    ("the cafe", ["at the cafe", "in the cafe"]),
    ("the library", ["in the library"]),
    ("the rooftop terrace", ["on the rooftop terrace"]),
    ("the third-floor lounge", ["in the third-floor lounge"]),
    ("the lobby", ["in the lobby"]),
]
NO_LOCATION_RATE = 0.35

# minutes -> surface forms
DURATIONS = {
    15: ["15 minutes", "a quarter of an hour", "15 min", "fifteen minutes"],
    20: ["20 minutes", "20 min", "twenty minutes"],
    30: ["30 minutes", "half an hour", "30 min", "thirty minutes"],
    45: ["45 minutes", "45 min", "three quarters of an hour", "forty-five minutes"],
    60: ["an hour", "one hour", "1 hour", "60 minutes", "1h"],
    75: ["75 minutes", "an hour and fifteen minutes", "an hour and a quarter"],
    90: ["1.5 hours", "an hour and a half", "90 minutes", "one and a half hours"],
    120: ["two hours", "2 hours", "2h", "120 minutes"],
    150: ["2.5 hours", "two and a half hours", "150 minutes"],
    180: ["three hours", "3 hours", "3h"],
}
DURATION_WEIGHTS = {15: 2, 20: 1, 30: 6, 45: 4, 60: 7, 75: 1, 90: 3, 120: 2, 150: 1, 180: 1}

WORDS = ["twelve", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine", "ten", "eleven", "twelve"]

# Sentence frames. Slots: {a_title} "a/an <title>", {title}, {day}, {on_day},
# {time}, {dur}, {people}, {loc} (" on Zoom" or ""), {locs} (" Location: Zoom."
# or ""). A capitalised slot name ({Title}, {Day}, {Time}, {Dur}) starts a sentence.
FRAMES = [
    "Can we set up {a_title} with {people} {on_day} at {time} for {dur}{loc}?",
    "Book {a_title} {on_day} at {time}{loc} with {people}, {dur}.",
    "Please schedule {a_title} for {day} at {time}. Attendees: {people}. Duration: {dur}.{locs}",
    "hey, could you put {a_title} on the calendar for {day} {time}? should take {dur}, with {people}{loc}.",
    "{Day} at {time} works for {people} - let's do the {title} then, {dur}{loc}.",
    "I'd like to organize {a_title} with {people}{loc}. How about {day} at {time}, for {dur}?",
    "Set up {title} {on_day}, {time}, {dur}, {people}{loc}.",
    "{Title} - {day} {time} - {dur} - {people}{loc}",
    "Would {people} be free {on_day} at {time}? I want to hold {a_title} for about {dur}{loc}.",
    "Please book {dur} {on_day} at {time} for {a_title} with {people}{loc}.",
    "Quick one: {title} with {people}, {day} {time}, {dur}{loc}.",
    "Good morning! Could you arrange {a_title} for {people} {on_day} starting at {time}? It should last {dur}.{locs}",
    "Let's meet {day} at {time} for {a_title}. {people} should join. Plan for {dur}{loc}.",
    "Need {a_title} {on_day} at {time}{loc}, {dur}, with {people}.",
    "Could you find {dur} {on_day} at {time} for {people} and me to do the {title}{loc}?",
    "Schedule the {title} for {day} at {time}, {dur} long, attendees {people}{loc}.",
    "Hi! I'm trying to get {people} together for {a_title}. {Day} at {time} for {dur}{loc} - does that work?",
    "Put {a_title} in the diary: {day}, {time}, {dur}{loc}. Invite {people}.",
    "Reserve {dur} for the {title} {on_day} at {time} with {people}{loc}, thanks!",
    "Is it possible to set up {a_title} {on_day} at {time}{loc}? {people} will attend; it should take {dur}.",
    "Kindly arrange {a_title} with {people} {on_day} at {time}. Expected duration is {dur}.{locs}",
    "{Title} with {people} {day} at {time} for {dur}{loc} please.",
    "Can you block {dur} {on_day} starting {time} for {a_title}? Invite {people}.{locs}",
    "Time for the {title} again. Let's say {day}, {time}, for {dur}, with {people}{loc}.",
    "I want to book the {title} for {day}. Start at {time}, run for {dur}, and include {people}.{locs}",
    "set up a meeting called {title} {on_day} at {time} for {dur} with {people}{loc}",
    "Would {day} at {time} work for {a_title}? Thinking {dur} with {people}{loc}.",
    "Heads up: I'd like to hold {a_title} with {people} {day} at {time}{loc}. Let's keep it to {dur}.",
    "Please add an event - {title}, {day} at {time}, lasting {dur}, attendees: {people}.{locs}",
    "Can we do the {title} {on_day}? {Time} works for me. {people} should be there, and let's plan for {dur}{loc}.",
    "Dear team, please set aside {dur} {on_day} at {time} for {a_title} with {people}{loc}. Thank you.",
    "Let's grab {dur} with {people} {on_day} around {time} for the {title}{loc}.",
    "New calendar item please: {title}. When: {day} at {time}. How long: {dur}. Who: {people}.{locs}",
    "Thanks for yesterday! Shall we follow up with {a_title} {on_day} at {time}? {Dur} with {people}{loc} should do.",
]


def cap(text):
    return text[:1].upper() + text[1:]


def article(title):
    return ("an " if title[0] in "aeio" else "a ") + title


def say_time(rng, h, m):
    """Return a surface form for the 24h time h:m (08:00-18:45)."""
    twelve = h % 12 or 12
    ampm = "am" if h < 12 else "pm"
    period = "in the morning" if h < 12 else ("in the afternoon" if h < 17 else "in the evening")
    hm = f"{twelve}" if m == 0 else f"{twelve}:{m:02d}"
    if h == 12 and m == 0 and rng.random() < 0.6:
        return rng.choice(["noon", "midday", "12 noon"])
    forms = [
        f"{hm}{ampm}",
        f"{hm} {rng.choice([ampm, ampm.upper(), ampm[0] + '.m.'])}",
        f"{h:02d}:{m:02d}",
        f"{twelve}:{m:02d} {period}" if m else f"{twelve} {period}",
    ]
    if h == 11 and m == 45:
        forms.append("quarter to noon")
    elif h != 12:  # word forms around twelve read oddly, so skip them
        if m == 0:
            words = rng.choice([f"{WORDS[twelve]} o'clock", WORDS[twelve]])
        elif m == 15:
            words = f"quarter past {WORDS[twelve]}"
        elif m == 30:
            words = f"half past {WORDS[twelve]}"
        else:
            words = f"quarter to {WORDS[twelve + 1]}"
        forms.append(f"{words} {period}")
    return rng.choice(forms)


def say_people(rng, names):
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} {rng.choice(['and', 'and', '&'])} {names[1]}"
    comma = rng.choice(["", ","])  # with or without the Oxford comma
    return ", ".join(names[:-1]) + f"{comma} and {names[-1]}"


def say_day(rng, day, with_on):
    prefix = rng.choices(["", "next ", "this ", "this coming "], weights=[8, 2, 2, 1])[0]
    if not prefix and with_on:
        return f"on {day}"
    return prefix + day


def make_example(rng, frame):
    title = rng.choice(TITLES)
    day = rng.choices(DAYS, weights=DAY_WEIGHTS)[0]
    h = rng.randint(8, 18)
    m = rng.choices([0, 15, 30, 45], weights=[6, 2, 4, 2])[0]
    minutes = rng.choices(list(DURATION_WEIGHTS), weights=list(DURATION_WEIGHTS.values()))[0]
    people = rng.sample(NAMES, rng.choices([1, 2, 3, 4], weights=[3, 4, 3, 2])[0])
    location, loc, locs = None, "", ""
    if rng.random() >= NO_LOCATION_RATE:
        location, phrases = rng.choice(LOCATIONS)
        phrase = rng.choice(phrases)
        loc = " " + phrase
        locs = rng.choice([f" Location: {location}.", f" We'll be {phrase}.",
                           f" Let's do it {phrase}.", f" Place: {location}."])
    time_text = say_time(rng, h, m)
    dur_text = rng.choice(DURATIONS[minutes])
    day_text = say_day(rng, day, with_on=False)
    sentence = frame.format(
        title=title, Title=cap(title), a_title=article(title),
        day=day_text, Day=cap(day_text), on_day=say_day(rng, day, with_on=True),
        time=time_text, Time=cap(time_text),
        dur=dur_text, Dur=cap(dur_text),
        people=say_people(rng, people), loc=loc, locs=locs,
    ).replace("..", ".")  # e.g. "4 p.m." at the end of a sentence
    answer = {"title": title, "day": day, "start": f"{h:02d}:{m:02d}",
              "minutes": minutes, "attendees": people, "location": location}
    return {"instruction": INSTRUCTION, "input": sentence,
            "output": json.dumps(answer, ensure_ascii=False)}


def main():
    rng = random.Random(SEED)
    total = sum(SPLITS.values())
    rows, seen = [], set()
    while len(rows) < total:
        frame = FRAMES[len(rows) % len(FRAMES)]  # cycle frames for an even mix
        row = make_example(rng, frame)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    rng.shuffle(rows)
    start = 0
    for split, count in SPLITS.items():
        path = OUT_DIR / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows[start:start + count]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {count:4d} rows to {path}")
        start += count


if __name__ == "__main__":
    main()
