"""Synthetic personal intents for the assistant's tests: phrasings x fillers, seeded."""

from __future__ import annotations

import numpy as np

NAMES = ["Sarah", "Tom", "Alice", "Bob", "the team", "Priya", "marketing", "my manager"]
DAYS = ["today", "tomorrow", "on Monday", "next week", "this afternoon", "on Friday"]
PHRASES = {
    "schedule_meeting": [
        "Schedule a meeting with {n}",
        "Set up a call with {n} {d}",
        "Book a meeting with {n} {d}",
        "Arrange a call with {n}",
        "Can you set up a meeting with {n} {d}",
        "Put a call with {n} on my calendar {d}",
    ],
    "send_email": [
        "Send an email to {n}",
        "Email {n} about the report",
        "Write a message to {n} {d}",
        "Draft an email for {n}",
        "Reply to {n}'s email",
        "Mail the slides to {n}",
    ],
    "weather": [
        "What's the weather {d}",
        "Will it rain {d}",
        "Is it going to be sunny {d}",
        "Weather forecast for {d}",
        "How cold will it be {d}",
        "Do I need an umbrella {d}",
    ],
    "play_music": [
        "Play some jazz",
        "Put on music by {n}",
        "Play my workout playlist",
        "Start the focus playlist {d}",
        "I want to listen to some rock",
        "Shuffle my favourite songs",
    ],
    "set_reminder": [
        "Remind me to call {n} {d}",
        "Set a reminder for the dentist {d}",
        "Don't let me forget to pay rent {d}",
        "Remind me about the report {d}",
        "Create a reminder to water the plants",
        "Ping me {d} about {n}",
    ],
}
RESPONSES = {
    "schedule_meeting": "I'll schedule a meeting. What time works best?",
    "send_email": "Here is a draft email for you to review.",
    "weather": "Here is the forecast.",
    "play_music": "Playing it now.",
    "set_reminder": "Reminder set.",
}


def examples(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, intent) pairs, balanced over the intents."""
    rng = np.random.default_rng(seed)
    intents = sorted(PHRASES)
    out = []
    for i in range(count):
        intent = intents[i % len(intents)]
        template = PHRASES[intent][rng.integers(len(PHRASES[intent]))]
        text = template.format(n=NAMES[rng.integers(len(NAMES))], d=DAYS[rng.integers(len(DAYS))])
        out.append((text, intent))
    return out
