"""The engine client's pure parts (service/scoring.py): the score formula and the reply's parsing."""

from __future__ import annotations

import math

import pytest

from service.prompt import AnswerTokens
from service.scoring import EngineError, p_yes, parse_answer_logprobs


def test_p_yes_is_the_two_way_softmax_and_stable():
    for yes, no in ((-0.1, -2.5), (-3.0, -0.2), (-1.0, -1.0), (-800.0, -0.1), (-0.1, -800.0)):
        expected = math.exp(yes) / (math.exp(yes) + math.exp(no)) if max(-yes, -no) < 700 else None
        got = p_yes(yes, no)
        assert 0.0 <= got <= 1.0
        if expected is not None:
            assert got == pytest.approx(expected, rel=1e-12)
    assert p_yes(-800.0, -0.1) < 1e-300 and p_yes(-0.1, -800.0) == 1.0


def test_parse_answer_logprobs_reads_by_token_id_and_index():
    body = {"choices": [
        {"index": 1, "logprobs": {"top_logprobs": [{"token_id:5": -0.5, "token_id:7": -1.5, "token_id:9": -0.1}]}},
        {"index": 0, "logprobs": {"top_logprobs": [{"token_id:5": -2.0, "token_id:7": -0.2}]}},
    ]}
    got = parse_answer_logprobs(body, AnswerTokens(yes=5, no=7), 2)
    assert [(a.yes, a.no) for a in got] == [(-2.0, -0.2), (-0.5, -1.5)]
    with pytest.raises(EngineError):
        parse_answer_logprobs({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:5": -1}]}}]},
                              AnswerTokens(yes=5, no=7), 1)
