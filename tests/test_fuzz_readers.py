"""Readers fuzzed (benchmarks/fuzz_readers.py, a short seeded budget): a corrupted dataset, codes file, model or
prior folder, checkpoint, params or specs.json is read as the commands read it, or refused with one UserError;
never another exception, a hang, or a change to the file read."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def fuzz():
    with benchmark_module("fuzz_readers") as module:
        yield module


@pytest.fixture(scope="module")
def project(fuzz, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_project")
    fuzz.make_project(root)
    return root


@settings(max_examples=90, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_corrupted_file_is_read_or_refused(fuzz, project, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(fuzz.READERS)), label="reader")
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    outcome = fuzz.run_case(project, tmp_path_factory.mktemp("case"), name, seed)
    assert outcome.result in ("read", "refused"), f"{name}, seed {seed}: {outcome}"


def test_an_internal_error_and_a_changed_input_are_caught(fuzz, project, tmp_path, monkeypatch):
    """The harness itself: a reader that raises KeyError, or writes to what it reads, is an internal error."""
    def broken(path, root):
        raise KeyError("checksum")

    def writer(path, root):
        path.write_text("written")

    monkeypatch.setitem(fuzz.READERS, "params", fuzz.Reader(broken, "params.yaml", ("",), "yaml"))
    assert fuzz.run_case(project, tmp_path / "a", "params", 1).detail.startswith("KeyError")
    monkeypatch.setitem(fuzz.READERS, "params", fuzz.Reader(writer, "params.yaml", ("",), "yaml"))
    assert fuzz.run_case(project, tmp_path / "b", "params", 1).detail == "the reader changed its input"
