"""Group Arena Reward (GAR), after the Ling 2.0 technical report.

For the n responses to one prompt, a generative judge referees every ordered pair (i, j), i != j: response i
is shown as "A" and j as "B", and both orders are judged, so a judge that favours the first (or second)
position adds the same bias to both sides and it cancels. The verdict on A relative to B is graded and
mapped to points (A gets +p, B gets -p). A response's reward is its cumulative points divided by the most it
could have collected, 2 * (n - 1) * max_points, so rewards lie in [-1, 1] and sum to 0 within a group.

Deviations / choices the report leaves open:
- Points: much better / better / tie / worse / much worse -> +2 / +1 / 0 / -1 / -2 (configurable ``points``).
- Normalisation: by the maximum attainable total (above), not by the group's empirical range, so a group
  where all responses tie gets 0 rewards rather than a division by zero.
- An unparseable verdict counts as a tie and is reported per response (``info["unparseable"]``) and in the
  reward's verdict; a judge *failure* (exception) is a reward error handled by the runner's fallback.
- ``strip_think`` (default on): the judge sees only the text after ``</think>``, since the report judges
  final answers, and long reasoning traces would crowd the judge's context.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.judges import Judge, make_judge
from rewards.registry import reward

DEFAULT_RUBRIC = """You are an impartial judge comparing two assistant responses to the same user request.
Judge helpfulness, correctness, depth, clarity and safety. Ignore the order in which the responses are shown
and their length unless it matters for quality.

[User request]
{question}

[Response A]
{response_a}

[Response B]
{response_b}

Explain your reasoning briefly, then finish with exactly one line of the form
Verdict: <much better|better|tie|worse|much worse>
where the verdict says how Response A compares with Response B."""

VERDICTS = ("much better", "better", "tie", "worse", "much worse")
DEFAULT_POINTS = {"much better": 2.0, "better": 1.0, "tie": 0.0, "worse": -1.0, "much worse": -2.0}
# Arena-Hard style labels are accepted as well: [[A>>B]] etc.
_BRACKETS = {"A>>B": "much better", "A>B": "better", "A=B": "tie", "B>A": "worse", "B>>A": "much worse"}
_VERDICT_RE = re.compile(
    r"verdict\s*[:=]?\s*\**\s*\[*\s*(much better|much worse|better|worse|tie)\b", re.IGNORECASE
)
_BRACKET_RE = re.compile(r"\[\[\s*(A>>B|A>B|A=B|B>A|B>>A)\s*\]\]")


def parse_verdict(text: str) -> str | None:
    """The graded verdict of A vs B in a judge's output (last one wins), or None when there is none."""
    if not isinstance(text, str):
        return None
    found = [(m.start(), m.group(1).lower()) for m in _VERDICT_RE.finditer(text)]
    found += [(m.start(), _BRACKETS[m.group(1)]) for m in _BRACKET_RE.finditer(text)]
    return max(found)[1] if found else None


def _final_text(response: str) -> str:
    return response.rsplit("</think>", 1)[-1].strip() if "</think>" in response else response


class GroupArenaReward:
    """Group reward: call with all samples of one prompt; returns one RewardResult per sample."""

    def __init__(
        self,
        judge: Any = None,
        rubric: str = DEFAULT_RUBRIC,
        points: dict[str, float] | None = None,
        strip_think: bool = True,
        max_response_chars: int = 8000,
    ):
        if judge is None:
            raise ValueError(
                "gar needs a judge: a Judge object, a registered judge name, or {'backend': 'openai', ...}"
            )
        self.judge: Judge = make_judge(judge)
        for field in ("{question}", "{response_a}", "{response_b}"):
            if field not in rubric:
                raise ValueError(f"GAR rubric must contain the placeholder {field}")
        self.rubric = rubric
        self.points = dict(DEFAULT_POINTS if points is None else points)
        if set(self.points) != set(VERDICTS):
            raise ValueError(
                f"GAR points must give a value for each of {VERDICTS}, got {sorted(self.points)}"
            )
        self.strip_think = strip_think
        self.max_response_chars = max_response_chars

    def _show(self, s: Sample) -> str:
        text = _final_text(s.response) if self.strip_think else s.response
        return text[: self.max_response_chars]

    def __call__(self, samples: list[Sample]) -> list[RewardResult]:
        n = len(samples)
        if n < 2:
            return [RewardResult(score=0.0, verdict="no_opponent") for _ in samples]
        question = samples[0].prompt
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        shown = [self._show(s) for s in samples]
        prompts = [
            self.rubric.replace("{question}", question)
            .replace("{response_a}", shown[i])
            .replace("{response_b}", shown[j])
            for i, j in pairs
        ]
        outputs = self.judge.judge(prompts)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"judge returned {len(outputs)} verdicts for {len(prompts)} contests")
        total = [0.0] * n
        unparseable = [0] * n
        record: list[list[tuple[int, str]]] = [[] for _ in range(n)]
        for (i, j), out in zip(pairs, outputs):
            verdict = parse_verdict(out)
            if verdict is None:
                unparseable[i] += 1
                unparseable[j] += 1
                verdict = "tie"
            p = self.points[verdict]
            total[i] += p
            total[j] -= p
            record[i].append((j, verdict))
        scale = 2 * (n - 1) * max(abs(v) for v in self.points.values())
        results = []
        for k in range(n):
            score = total[k] / scale if scale else 0.0
            results.append(
                RewardResult(
                    score=score,
                    verdict="judged" if not unparseable[k] else f"judged_with_{unparseable[k]}_unparseable",
                    info={
                        "points": total[k],
                        "unparseable": unparseable[k],
                        "contests": 2 * (n - 1),
                        "as_a": record[k],
                    },
                )
            )
        return results


reward("gar", group=True)(GroupArenaReward)
