"""Group Arena Reward with scripted judges (exact scores), the HTTP judge against a local server, and the
engine adapter."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import RewardRunner, Sample
from rewards.gar import GroupArenaReward, parse_verdict
from rewards.judges import EngineJudge, OpenAIJudge, make_judge, register_judge

RUBRIC = "Q={question}\nA={response_a}\nB={response_b}"


def _ab(prompt: str) -> tuple[str, str]:
    a = prompt.split("\nA=", 1)[1].split("\nB=", 1)[0]
    b = prompt.split("\nB=", 1)[1]
    return a, b


class QualityJudge:
    """Scripted: the response with the larger number wins; by 2+ it is 'much better'."""

    def __init__(self):
        self.calls = 0

    def judge(self, prompts):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            a, b = (int(x) for x in _ab(p))
            d = a - b
            v = (
                "much better"
                if d >= 2
                else "better"
                if d == 1
                else "tie"
                if d == 0
                else "worse"
                if d == -1
                else "much worse"
            )
            out.append(f"reasoning...\nVerdict: {v}")
        return out


class BiasedJudge:
    """Always says A is better: position bias only. Both orders make it cancel to all-zero rewards."""

    def judge(self, prompts):
        return ["Verdict: better"] * len(prompts)


class GarbageJudge:
    def judge(self, prompts):
        return ["I refuse to answer." if i % 2 else "[[A>B]]" for i in range(len(prompts))]


def _group(*responses):
    return [Sample(prompt="q", response=r) for r in responses]


def test_scripted_scores_are_exact():
    judge = QualityJudge()
    gar = GroupArenaReward(judge=judge, rubric=RUBRIC)
    res = gar(_group("3", "1", "2"))
    # 3 vs 1: much better (+2) both orders; 3 vs 2: better (+1) both orders -> points 2*2 + 2*1 = 6.
    # Normaliser: 2 * (n-1) * max_points = 2 * 2 * 2 = 8.
    assert [r.score for r in res] == [6 / 8, -6 / 8, 0.0]
    assert judge.calls == 6 and [r.info["contests"] for r in res] == [4, 4, 4]
    assert sum(r.score for r in res) == 0.0


def test_position_bias_cancels():
    res = GroupArenaReward(judge=BiasedJudge(), rubric=RUBRIC)(_group("1", "2", "3", "4"))
    assert [r.score for r in res] == [0.0, 0.0, 0.0, 0.0]


def test_unparseable_verdicts_are_ties_and_reported():
    res = GroupArenaReward(judge=GarbageJudge(), rubric=RUBRIC)(_group("x", "y"))
    # Contest order: (0,1) -> "[[A>B]]" (0 better, +1), (1,0) -> unparseable (tie).
    assert [r.score for r in res] == [1 / 4, -1 / 4]
    assert [r.info["unparseable"] for r in res] == [1, 1]
    assert res[0].verdict == "judged_with_1_unparseable"


def test_parse_verdict_forms():
    assert parse_verdict("blah\nVerdict: **Much Worse**") == "much worse"
    assert parse_verdict("Verdict: better ... actually Verdict: tie") == "tie"
    assert parse_verdict("[[B>>A]]") == "much worse"
    assert parse_verdict("A is better") is None


def test_gar_through_runner_groups_by_prompt_and_strips_think():
    register_judge("scripted_quality", QualityJudge())
    runner = RewardRunner(
        {"terms": [{"name": "gar", "args": {"judge": "scripted_quality", "rubric": RUBRIC}}]}
    )
    samples = [
        Sample(prompt="p1", response="<think>long</think>2"),
        Sample(prompt="p2", response="5"),
        Sample(prompt="p1", response="1"),
        Sample(prompt="p2", response="5"),
        Sample(prompt="p3", response="9"),
    ]
    out = [o.score for o in runner.score(samples)]
    # p1: "2" beats "1" by one ("better") in both orders: 2 points of a possible 2 * 1 * 2 = 4.
    assert out == [0.5, 0.0, -0.5, 0.0, 0.0]


def test_bad_gar_config_is_a_clear_error():
    with pytest.raises(ValueError, match="placeholder"):
        GroupArenaReward(judge=BiasedJudge(), rubric="no placeholders")
    with pytest.raises(ValueError, match="register_judge"):
        GroupArenaReward(judge="nobody")
    with pytest.raises(ValueError, match="points"):
        GroupArenaReward(judge=BiasedJudge(), points={"better": 1})


class _Handler(BaseHTTPRequestHandler):
    seen: list = []  # noqa: RUF012

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        a, b = (int(x) for x in _ab(prompt))
        verdict = "better" if a > b else "worse" if a < b else "tie"
        data = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": f"Verdict: {verdict}"}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_judge_against_local_server(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = make_judge(
            {"backend": "openai", "base_url": base, "model": "tiny", "api_key_env": "JUDGE_KEY"}
        )
        assert isinstance(judge, OpenAIJudge)
        res = GroupArenaReward(judge=judge, rubric=RUBRIC)(_group("1", "2"))
        assert [r.score for r in res] == [-0.5, 0.5]  # "worse" in both orders: -2 of a possible 4
        path, auth, body = _Handler.seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "tiny"
    finally:
        server.shutdown()


class FakeEngine:
    """Stands in for an rlplat rollout engine: only generate_text(prompts, max_new_tokens) is needed."""

    def __init__(self):
        self.max_new_tokens = None

    def generate_text(self, prompts, max_new_tokens):
        self.max_new_tokens = max_new_tokens
        return ["Verdict: tie"] * len(prompts)


def test_engine_judge_adapter():
    engine = FakeEngine()
    res = GroupArenaReward(judge=EngineJudge(engine, max_new_tokens=64), rubric=RUBRIC)(_group("a", "b", "c"))
    assert [r.score for r in res] == [0.0, 0.0, 0.0] and engine.max_new_tokens == 64
    with pytest.raises(TypeError, match="generate_text"):
        EngineJudge(object())


def test_end_to_end_with_a_tiny_model_as_judge():
    """A real (random) tiny rlplat model refereeing: every contest is judged, verdicts it cannot be parsed
    into count as ties, and the scores of a group still sum to zero (each contest adds +x to one side and −x
    to the other)."""
    runner = RewardRunner(
        {
            "terms": [
                {
                    "name": "gar",
                    "timeout_s": 300,
                    "args": {
                        "judge": {"backend": "native", "preset": "tiny", "seed": 1, "max_new_tokens": 6}
                    },
                }
            ]
        }
    )
    samples = [Sample(prompt="2+2=", response=r, metadata={"group_id": 0}) for r in ("4", "5", "22")]
    out = runner.score(samples)
    assert not any(o.errors for o in out), [o.errors for o in out]
    results = [o.components["gar"] for o in out]
    assert all(-1.0 <= r.score <= 1.0 for r in results)
    assert abs(sum(r.score for r in results)) < 1e-9
    # 3 responses: each takes part in 2 * (3 - 1) = 4 judged contests
    assert all(r.info["contests"] == 4 for r in results), [r.info for r in results]


class ReentrancyProbe:
    """A TextGenerator that records how many callers are inside it at once; an engine takes one."""

    def __init__(self):
        self.inside = self.most = 0
        self.count_lock = threading.Lock()

    def generate_text(self, prompts, max_new_tokens):
        with self.count_lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.05)  # long enough for the other groups' threads to arrive
        with self.count_lock:
            self.inside -= 1
        return ["Verdict: tie"] * len(prompts)


def test_engine_judge_lets_one_group_at_a_time_into_its_engine():
    probe = ReentrancyProbe()
    runner = RewardRunner(
        {
            "terms": [{"name": "gar", "args": {"judge": EngineJudge(probe), "rubric": RUBRIC}}],
            "max_concurrency": 8,
        }
    )
    out = runner.score([Sample(prompt=f"p{g}", response=str(k)) for g in range(4) for k in range(2)])
    assert not any(o.errors for o in out) and probe.most == 1


def _native_gar_runner(max_concurrency: int) -> RewardRunner:
    judge = {"backend": "native", "preset": "tiny", "seed": 1, "max_new_tokens": 6}
    return RewardRunner(
        {
            "terms": [{"name": "gar", "timeout_s": 300, "args": {"judge": judge}}],
            "max_concurrency": max_concurrency,
        }
    )


def test_native_judge_is_safe_under_concurrent_groups():
    """Issue 14: with several prompt groups judged at once (the runner's threads, up to max_concurrency), the
    native judge's engine was driven from two threads and failed with IndexError/KeyError. Every group must
    now be judged, with the scores it gets when groups are judged one at a time (the judge is greedy)."""
    samples = [
        Sample(prompt=f"{a}+{a}=", response=r, metadata={"group_id": a})
        for a in range(4)
        for r in (str(2 * a), str(2 * a + 1), "7")
    ]
    concurrent = _native_gar_runner(max_concurrency=8).score(samples)
    assert not any(o.errors for o in concurrent), [o.errors for o in concurrent if o.errors]
    one_at_a_time = _native_gar_runner(max_concurrency=1).score(samples)
    assert [o.score for o in concurrent] == [o.score for o in one_at_a_time]
    assert all(o.components["gar"].info["contests"] == 4 for o in concurrent)
