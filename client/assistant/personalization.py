"""The personalization engine: what style, tone, detail, format and expertise suit this user.

Explicit choices (`update_preference`) always win. Otherwise each dimension
is learned from rated interactions: every rated response is an observation
of one value per dimension (its length gives the detail level; its style,
tone and format come from the assistant's own labels in the context, or from
lexical cues in the response), and the rating r in 1..5 counts as a
fractional success s = (r - 1) / 4 for that value. Each value has a
Beta(1 + sum w*s, 1 + sum w*(1 - s)) posterior over "the user rates this
value well", where w = 0.5 ** (age / half_life) lets old evidence decay. The
learned value is the one with the highest posterior mean; its confidence is
the posterior probability that it is the best (Monte Carlo over the Betas,
seeded so answers are reproducible). Learning can be switched off per
dimension; it then keeps its explicit or default value.

Expertise per topic is a Dirichlet over the four levels fed by every
interaction whose context names the topic: the query's vocabulary (beginner
phrasing versus specialist terms) places it on the 0..3 scale, and a rating
of the response's depth moves it (a well-rated detailed/technical answer
suggests more expertise, a poorly rated one less).

`plan_response()` draws each learned dimension from its posterior (Thompson
sampling), so the assistant keeps trying alternatives while it is unsure;
the benchmark (`benchmarks/personalization.py`) uses it the way the
assistant would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from client.assistant.store import UserStore

__all__ = [
    "ALLOWED",
    "DEFAULTS",
    "Dimension",
    "PersonalizationEngine",
    "Preference",
    "detail_of",
    "observe_response",
]


class Dimension(StrEnum):
    STYLE = "communication_style"
    DETAIL = "detail_level"
    TONE = "tone"
    FORMAT = "response_format"


ALLOWED: dict[str, tuple[str, ...]] = {
    Dimension.STYLE: ("professional", "casual", "friendly", "technical"),
    Dimension.DETAIL: ("brief", "medium", "detailed"),
    Dimension.TONE: ("formal", "neutral", "friendly", "humorous"),
    Dimension.FORMAT: ("conversational", "structured", "bullet_points"),
}
EXPERTISE = ("beginner", "intermediate", "advanced", "expert")
EXPERTISE_PREFIX = "expertise_level."
DEFAULTS: dict[str, str] = {
    Dimension.STYLE: "friendly",
    Dimension.DETAIL: "medium",
    Dimension.TONE: "neutral",
    Dimension.FORMAT: "conversational",
}
DEFAULT_EXPERTISE = "intermediate"
# The context keys through which the assistant labels the response it generated.
CONTEXT_LABELS = {
    Dimension.STYLE: "style",
    Dimension.TONE: "tone",
    Dimension.FORMAT: "format",
    Dimension.DETAIL: "detail_level",
}
BRIEF_MAX_WORDS = 60
MEDIUM_MAX_WORDS = 200
_TOPIC = re.compile(r"[\w][\w .+#/-]{0,63}")


@dataclass(frozen=True)
class Preference:
    dimension: str
    value: str
    source: str  # "explicit", "learned" or "default"
    confidence: float  # posterior probability that value is the best; 1.0 when explicit
    evidence: float  # decayed number of rated observations behind a learned value


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def detail_of(text: str) -> str:
    n = len(_words(text))
    return "brief" if n < BRIEF_MAX_WORDS else "medium" if n <= MEDIUM_MAX_WORDS else "detailed"


_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    Dimension.STYLE: {
        "technical": ("```", "`", "o(n", "api", "parameter", "function", "algorithm", "latency"),
        "casual": ("gonna", "yeah", "hey", "cool", "stuff", "btw", "kinda", "wanna"),
        "friendly": ("happy to", "glad", "hope this helps", "great question", "!"),
        "professional": ("please", "regards", "recommend", "accordingly", "ensure"),
    },
    Dimension.TONE: {
        "formal": ("therefore", "furthermore", "accordingly", "hereby", "kindly"),
        "humorous": ("haha", "lol", "joke", "pun", "😄", "😂"),
        "friendly": ("glad", "happy to", "!", "😊", "cheers"),
    },
}


def _by_cues(dimension: str, text: str) -> str | None:
    low = text.lower()
    scores = {v: sum(low.count(c) for c in cues) for v, cues in _CUES[dimension].items()}
    best = max(scores, key=lambda v: scores[v])
    return best if scores[best] > 0 else None


def _format_of(text: str) -> str:
    lines = text.splitlines()
    bullets = sum(1 for ln in lines if re.match(r"\s*([-*•]|\d+[.)])\s+", ln))
    headings = sum(1 for ln in lines if re.match(r"\s*(#+\s+\S|\S[^.!?]{0,60}:\s*$)", ln))
    if bullets >= 2:
        return "bullet_points"
    if headings >= 1:
        return "structured"
    return "conversational"


def observe_response(response: str, context: Mapping[str, Any]) -> dict[str, str]:
    """The value of each dimension this response shows: the assistant's labels, else cues."""
    seen: dict[str, str] = {}
    for dim in Dimension:
        label = context.get(CONTEXT_LABELS[dim])
        if isinstance(label, str) and label in ALLOWED[dim]:
            seen[dim] = label
    seen.setdefault(Dimension.DETAIL, detail_of(response))
    seen.setdefault(Dimension.FORMAT, _format_of(response))
    for dim in (Dimension.STYLE, Dimension.TONE):
        if dim not in seen and (cue := _by_cues(dim, response)) is not None:
            seen[dim] = cue
    return seen


_BEGINNER = (
    "what is",
    "what's a",
    "what are",
    "how do i start",
    "beginner",
    "new to",
    "simple",
    "simply",
    "basics",
    "eli5",
    "explain like",
    "first time",
    "don't understand",
)
_ADVANCED = (
    "optimiz",
    "internals",
    "concurren",
    "asynchron",
    "benchmark",
    "profil",
    "complexity",
    "architecture",
    "trade-off",
    "tradeoff",
    "latency",
    "throughput",
    "memory layout",
    "garbage collect",
    "bytecode",
    "compiler",
    "lock-free",
    "vectoriz",
    "cache miss",
    "index",
    "query plan",
    "metaclass",
    "descriptor",
    "gil",
)


def vocabulary_level(query: str) -> float:
    """Where a query's wording sits on the 0 (beginner) .. 3 (expert) scale."""
    low = query.lower()
    beginner = sum(low.count(c) for c in _BEGINNER)
    advanced = sum(low.count(c) for c in _ADVANCED)
    words = _words(query)
    long_words = sum(1 for w in words if len(w) >= 10) / max(len(words), 1)
    score = 1.5 + 0.9 * advanced - 0.9 * beginner + 2.0 * long_words
    return float(np.clip(score, 0.0, 3.0))


class PersonalizationEngine:
    """One user's preferences: explicit, learned, and the prompt prefix built from them."""

    def __init__(
        self,
        user_id: str,
        store: UserStore | None = None,
        half_life_days: float = 90.0,
        seed: int = 0,
    ) -> None:
        self.store = store if store is not None else UserStore(user_id)
        self.user_id = self.store.user_id
        if not half_life_days > 0:
            raise ValueError("half_life_days must be positive")
        self.half_life_days = half_life_days
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ explicit
    @staticmethod
    def validate(key: object, value: object) -> tuple[str, str]:
        if not isinstance(key, str):
            raise ValueError(f"preference key must be a string, got {type(key).__name__}")
        if key.startswith(EXPERTISE_PREFIX):
            topic = key[len(EXPERTISE_PREFIX) :]
            if not _TOPIC.fullmatch(topic):
                raise ValueError(
                    f"{key!r}: the topic after 'expertise_level.' must be 1-64 letters, digits, "
                    "spaces or . + # / - _"
                )
            allowed: tuple[str, ...] = EXPERTISE
        elif key in ALLOWED:
            allowed = ALLOWED[key]
        else:
            raise ValueError(
                f"unknown preference {key!r}; allowed: {', '.join(ALLOWED)}, "
                "expertise_level.<topic>"
            )
        norm = value.strip().lower().replace(" ", "_") if isinstance(value, str) else value
        if norm not in allowed:
            raise ValueError(f"{key} cannot be {value!r}; allowed: {', '.join(allowed)}")
        return key, str(norm)

    def update_preference(self, key: str, value: str) -> None:
        """Set a preference explicitly; it wins over anything learned."""
        key, value = self.validate(key, value)
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO preferences VALUES (?, ?, ?)",
                (key, value, self.store.clock()),
            )

    def clear_preference(self, key: str) -> None:
        """Forget an explicit choice, so the learned (or default) value applies again."""
        if key not in ALLOWED and not key.startswith(EXPERTISE_PREFIX):
            self.validate(key, "")  # raises the unknown-key error
        with self.store.transaction() as db:
            db.execute("DELETE FROM preferences WHERE key = ?", (key,))

    def explicit_preferences(self) -> dict[str, str]:
        return {k: v for k, v in self.store.query("SELECT key, value FROM preferences")}

    def set_learning(self, dimension: str, enabled: bool) -> None:
        """Switch learning of one dimension (or 'expertise') on or off."""
        if dimension not in ALLOWED and dimension != "expertise":
            raise ValueError(
                f"unknown dimension {dimension!r}; allowed: {', '.join(ALLOWED)}, expertise"
            )
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO learning VALUES (?, ?)", (dimension, int(bool(enabled)))
            )

    def learning_enabled(self, dimension: str) -> bool:
        rows = self.store.query("SELECT enabled FROM learning WHERE dimension = ?", (dimension,))
        return bool(rows[0][0]) if rows else True

    # ------------------------------------------------------------------ evidence
    def record_interaction(
        self,
        query: str,
        response: str,
        context: Mapping[str, Any] | None = None,
        user_feedback: int | None = None,
    ) -> int:
        """Store one exchange and what it shows; returns its id. Feedback is 1..5 or None."""
        store = self.store
        store.check_text("query", query)
        store.check_text("response", response)
        context = {} if context is None else context
        if not isinstance(context, Mapping):
            raise ValueError(f"context must be a mapping, got {type(context).__name__}")
        if user_feedback is not None and (
            isinstance(user_feedback, bool)
            or not isinstance(user_feedback, int)
            or not 1 <= user_feedback <= 5
        ):
            raise ValueError(f"user_feedback must be an integer from 1 to 5, got {user_feedback!r}")
        topic = context.get("topic")
        if topic is not None and (not isinstance(topic, str) or not _TOPIC.fullmatch(topic)):
            raise ValueError(f"context topic {topic!r} must be 1-64 letters, digits or . + # / -")
        ctx_json = store.to_json("context", dict(context))
        observed = json.dumps(observe_response(response, context))
        with store.transaction() as db:
            store.check_count(db, "interactions", store.limits.max_interactions, "interactions")
            cur = db.execute(
                "INSERT INTO interactions (ts, query, response, context, feedback, observed) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (store.clock(), query, response, ctx_json, user_feedback, observed),
            )
            row_id = int(cur.lastrowid)
        store.maybe_purge()
        return row_id

    def _weights(self, ts: np.ndarray) -> np.ndarray:
        age_days = np.maximum(self.store.clock() - ts, 0.0) / 86400.0
        return np.asarray(0.5 ** (age_days / self.half_life_days))

    def posterior(self, dimension: str) -> dict[str, tuple[float, float]]:
        """Beta(alpha, beta) per value of a dimension, from decayed rated observations."""
        if dimension not in ALLOWED:
            raise ValueError(f"unknown dimension {dimension!r}; allowed: {', '.join(ALLOWED)}")
        rows = self.store.query(
            "SELECT ts, feedback, json_extract(observed, ?) FROM interactions "
            "WHERE feedback IS NOT NULL",
            (f"$.{dimension}",),
        )
        values = ALLOWED[dimension]
        alpha = np.ones(len(values))
        beta = np.ones(len(values))
        if rows:
            ts = np.array([r[0] for r in rows], dtype=float)
            s = (np.array([r[1] for r in rows], dtype=float) - 1.0) / 4.0
            index = {v: i for i, v in enumerate(values)}
            which = np.array([index.get(r[2], -1) for r in rows])
            keep = which >= 0
            w = self._weights(ts)[keep]
            np.add.at(alpha, which[keep], w * s[keep])
            np.add.at(beta, which[keep], w * (1.0 - s[keep]))
        return {v: (float(a), float(b)) for v, a, b in zip(values, alpha, beta, strict=True)}

    def _learned(self, dimension: str) -> tuple[str, float, float]:
        post = self.posterior(dimension)
        values = list(post)
        a = np.array([post[v][0] for v in values])
        b = np.array([post[v][1] for v in values])
        evidence = float((a + b - 2.0).sum())
        mean = a / (a + b)
        draws = np.random.default_rng(self._seed).beta(a, b, size=(4000, len(values)))
        p_best = np.bincount(draws.argmax(axis=1), minlength=len(values)) / draws.shape[0]
        best = int(mean.argmax())
        return values[best], float(p_best[best]), evidence

    def get_preference(self, dimension: str) -> Preference:
        """The value in force: explicit, else learned (when on and evidenced), else default."""
        if dimension.startswith(EXPERTISE_PREFIX):
            topic = dimension[len(EXPERTISE_PREFIX) :]
            return self._expertise(topic)
        if dimension not in ALLOWED:
            raise ValueError(f"unknown dimension {dimension!r}; allowed: {', '.join(ALLOWED)}")
        explicit = self.explicit_preferences().get(dimension)
        if explicit is not None:
            return Preference(dimension, explicit, "explicit", 1.0, 0.0)
        if self.learning_enabled(dimension):
            value, confidence, evidence = self._learned(dimension)
            if evidence >= 1.0:
                return Preference(dimension, value, "learned", confidence, evidence)
        return Preference(dimension, DEFAULTS[dimension], "default", 0.0, 0.0)

    def plan_response(self) -> dict[str, str]:
        """Values for the next response: fixed where explicit, Thompson draws where learned."""
        explicit = self.explicit_preferences()
        plan: dict[str, str] = {}
        for dim, values in ALLOWED.items():
            if dim in explicit:
                plan[dim] = explicit[dim]
            elif not self.learning_enabled(dim):
                plan[dim] = DEFAULTS[dim]
            else:
                post = self.posterior(dim)
                draws = [self._rng.beta(*post[v]) for v in values]
                plan[dim] = values[int(np.argmax(draws))]
        return plan

    # ------------------------------------------------------------------ expertise
    def _expertise(self, topic: str) -> Preference:
        key = EXPERTISE_PREFIX + topic
        self.validate(key, DEFAULT_EXPERTISE)
        explicit = self.explicit_preferences().get(key)
        if explicit is not None:
            return Preference(key, explicit, "explicit", 1.0, 0.0)
        if self.learning_enabled("expertise"):
            counts = self.expertise_posterior(topic)
            evidence = float(counts.sum() - len(EXPERTISE))
            if evidence >= 1.0:
                p = counts / counts.sum()
                best = int(p.argmax())
                return Preference(key, EXPERTISE[best], "learned", float(p[best]), evidence)
        return Preference(key, DEFAULT_EXPERTISE, "default", 0.0, 0.0)

    def expertise_posterior(self, topic: str) -> np.ndarray:
        """Dirichlet counts over (beginner, intermediate, advanced, expert) for a topic."""
        rows = self.store.query(
            "SELECT ts, query, feedback, observed FROM interactions "
            "WHERE json_extract(context, '$.topic') = ?",
            (topic,),
        )
        counts = np.ones(len(EXPERTISE))
        if not rows:
            return counts
        ts = np.array([r[0] for r in rows], dtype=float)
        level = np.array([vocabulary_level(r[1]) for r in rows])
        for i, (_, _, feedback, observed) in enumerate(rows):
            if feedback is None:
                continue
            seen = json.loads(observed)
            deep = seen.get(Dimension.DETAIL) == "detailed" or seen.get(Dimension.STYLE) == (
                "technical"
            )
            shallow = seen.get(Dimension.DETAIL) == "brief"
            # A well-rated deep answer (or a badly rated shallow one) suggests more expertise.
            lift = (feedback - 3) / 2.0 * 0.5
            level[i] += lift if deep else -lift if shallow else 0.0
        level = np.clip(level, 0.0, 3.0)
        # Soft assignment: each observation spreads over the nearby levels.
        kernel = np.exp(-0.5 * ((level[:, None] - np.arange(4)[None, :]) / 0.5) ** 2)
        kernel /= kernel.sum(axis=1, keepdims=True)
        counts += (self._weights(ts)[:, None] * kernel).sum(axis=0)
        return np.asarray(counts)

    def analyze_expertise_level(self, topic: str) -> str:
        """The user's level in a topic: explicit, else learned from interactions, else default."""
        if not isinstance(topic, str):
            raise ValueError(f"topic must be a string, got {type(topic).__name__}")
        return self._expertise(topic).value

    # ------------------------------------------------------------------ prompt
    def get_personalized_prompt_prefix(self, topic: str | None = None) -> str:
        """An instruction prefix for a language model from the preferences in force."""
        style = self.get_preference(Dimension.STYLE).value
        tone = self.get_preference(Dimension.TONE).value
        detail = self.get_preference(Dimension.DETAIL).value
        fmt = self.get_preference(Dimension.FORMAT).value
        lines = [f"Respond in a {tone} tone with a {style} style."]
        lines.append(
            {
                "brief": "Keep answers brief: a few sentences, no digressions.",
                "medium": "Give moderately detailed answers.",
                "detailed": "Provide detailed explanations with examples.",
            }[detail]
        )
        if fmt == "structured":
            lines.append("Structure the answer with short headed sections.")
        elif fmt == "bullet_points":
            lines.append("Present the answer as bullet points.")
        if topic is not None:
            level = self.analyze_expertise_level(topic)
            hint = {
                "beginner": "explain terms and avoid jargon",
                "intermediate": "assume the fundamentals",
                "advanced": "skip the basics and go into depth",
                "expert": "be precise and technical; no introductions",
            }[level]
            lines.append(f"The user is {level} in {topic}: {hint}.")
        return "\n".join(lines)
