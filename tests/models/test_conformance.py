"""The conformance suite (tests/models/conformance.py) over every family: each family's test module lists its
cases in ``CASES``; a new family is one more module name in ``FAMILY_MODULES``."""

from __future__ import annotations

import importlib

import pytest

from tests.models import conformance as conf

FAMILY_MODULES = ["test_vilt", "test_dual", "test_blip", "test_blip2", "test_llava", "test_llava_next",
                  "test_paligemma", "test_gemma3", "test_idefics3", "test_internvl", "test_mistral3",
                  "test_qwen2vl", "test_idefics2", "test_aya_vision", "test_mllama"]
CASES = [c for m in FAMILY_MODULES for c in importlib.import_module(f"tests.models.{m}").CASES]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def subject(request, tmp_path_factory) -> conf.Subject:
    return conf.subject(request.param, tmp_path_factory)


def _applies(subject, check):
    if not subject.case.applies(check):
        pytest.skip(f"{check} does not apply to {subject.case.id}")


def test_token_table_is_the_models_inputs(subject):
    _applies(subject, "token_table")
    conf.check_token_table(subject)


def test_stored_weights_are_the_models_attention(subject):
    _applies(subject, "attention")
    conf.check_attention(subject)


def test_statistic_by_hand(subject):
    _applies(subject, "statistic")
    conf.check_statistic(subject)


def test_answer_is_the_models_own(subject):
    _applies(subject, "answer")
    conf.check_answer(subject)


def test_every_page(subject, monkeypatch):
    _applies(subject, "pages")
    conf.check_pages(subject, monkeypatch)


def test_captured_module_is_the_models_own_output(subject):
    _applies(subject, "modules")
    conf.check_modules(subject)


def test_probe_reads_the_lake(subject):
    _applies(subject, "probe")
    conf.check_probe_tokens(subject)
