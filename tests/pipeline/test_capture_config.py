"""The capture contract (pipeline/capture_config.py): typed, torch-free, parsed and serialised once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.capture_config import (AttentionPolicy, Budget, Capture, ExplainSet, HiddenAll, HiddenLayers,
                                     HiddenNone, HiddenPolicy, HiddenSample, KeepAll, Mass, TopK)


def test_imports_no_torch():
    code = ("import sys, pipeline.capture_config as c; c.Capture.from_json(c.Capture().to_json()); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_each_option_parses_to_its_type():
    assert AttentionPolicy.parse("budget:8:0.9:2") == Budget(8, 0.9, 2)
    assert AttentionPolicy.parse("topk:3") == TopK(3) and AttentionPolicy.parse("mass:0.5") == Mass(0.5)
    assert AttentionPolicy.parse(None) == KeepAll() and KeepAll() != AttentionPolicy.parse("none")
    assert HiddenPolicy.parse("all") == HiddenAll() and HiddenPolicy.parse("none") == HiddenNone()
    assert HiddenPolicy.parse("sample:7") == HiddenSample(7)
    assert HiddenPolicy.parse("12, 0,4") == HiddenLayers(frozenset({0, 4, 12}))
    assert HiddenPolicy.parse("0,4").layers() == {0, 4} and HiddenPolicy.parse("none").layers() == set()
    assert HiddenPolicy.parse("all").layers() is None and HiddenPolicy.parse("sample:3").layers() is None
    assert HiddenPolicy.parse("sample:3").sample() == 3 and HiddenPolicy.parse("0,4").sample() is None
    assert ExplainSet.parse("sinks, Rollout").methods == ("rollout", "sinks") and "sinks" in ExplainSet.parse("sinks")


@pytest.mark.parametrize("text, says", [("sample:x", "sample:N needs a whole number"),
                                         ("sample:-1", "sample:N needs a whole number"),
                                         ("1,x", "comma-separated list of layers"),
                                         ("-1", "0 (embeddings) or more")])
def test_bad_keep_hidden_is_one_sentence(text, says):
    with pytest.raises(ValueError, match="--keep-hidden") as e:
        HiddenPolicy.parse(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_runs_row_capture_round_trips_in_the_recorded_format():
    cap = Capture.from_options("topk:2", "0,4", "value,rollout", 16)
    text = cap.to_json()
    assert json.loads(text) == {"chunk_size": 16, "explain": "rollout,value", "keep_attention": "topk:2",
                                "keep_hidden": "0,4", "random_weights": False}
    assert Capture.from_json(text) == cap and Capture.from_json(json.loads(text)).to_json() == text
    assert json.loads(Capture().to_json()) == {"chunk_size": 64, "explain": "", "keep_attention": "budget:8:0.9:2",
                                               "keep_hidden": "sample:256", "random_weights": False}
    with pytest.raises(TypeError):
        Capture.from_json('{"keep_attention": "all", "bogus": 1}')
