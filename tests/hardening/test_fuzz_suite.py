"""Fuzzing the suite loader (issue 14): random YAML documents and random mutations of the suites in suites/. The
loader (and the expansion `kdbench validate` runs after it) either succeeds or raises KdbenchError, kdbench's input
error; never another exception.
"""

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdbench.errors import KdbenchError
from kdbench.plan import expand
from kdbench.suite import load_suite

SUITES = sorted((Path(__file__).resolve().parents[2] / "suites").glob("*.yaml"))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", ".", "..", "a/b", "inf", "-1", "1e9", "0", "bert", "logit", "int8", "cpu", "jsd",
                     "generated_sentiment", "text_classification", "~", "null", "yes"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner,
                                                 max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="kdbench-fuzz-") as tmp:
        yield Path(tmp)


def loads_or_refuses(folder: Path, text: str | bytes) -> None:
    """The property: a Suite (that expands), or a KdbenchError with a one-line message."""
    path = folder / "suite.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        expand(load_suite(path))
    except KdbenchError as e:
        assert "\n" not in str(e), str(e)


# ---------------------------------------------------------------------------------------------------------------
# Random documents


@FUZZ
@given(data=values)
def test_random_yaml_documents(folder, data):
    loads_or_refuses(folder, yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("abn: -[]{},'\"&*!|>#\n\t.01?%@`~\\<=")), max_size=80))
def test_random_yaml_text(folder, text):
    loads_or_refuses(folder, text)


@FUZZ
@given(raw=st.binary(max_size=60))
def test_random_bytes(folder, raw):
    loads_or_refuses(folder, raw)


# ---------------------------------------------------------------------------------------------------------------
# Mutations of the shipped suites: of their text, and of their data


def _paths(node, prefix=()):
    """Every key path in a YAML document's data."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _delete(data, path):
    node = data
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]


@FUZZ
@given(suite=st.sampled_from(SUITES), draw=st.data())
def test_mutated_suite_data(folder, suite, draw):
    data = yaml.safe_load(suite.read_text())
    for _ in range(draw.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(data) if p]
        path = draw.draw(st.sampled_from(paths), label="path")
        action = draw.draw(st.sampled_from(["replace", "delete", "add", "wrap"]), label="action")
        if action == "replace":
            _set(data, path, draw.draw(values, label="value"))
        elif action == "delete":
            _delete(data, path)
        elif action == "add":
            node = data
            for k in path[:-1]:
                node = node[k]
            if isinstance(node, dict):
                node[draw.draw(st.text(max_size=10), label="key")] = draw.draw(values, label="value")
            else:
                node.append(draw.draw(values, label="value"))
        else:  # a value where a list is expected, or the other way round
            node = data
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = [node[path[-1]]]
    loads_or_refuses(folder, yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(suite=st.sampled_from(SUITES), draw=st.data())
def test_mutated_suite_text(folder, suite, draw):
    lines = suite.read_text().splitlines()
    for _ in range(draw.draw(st.integers(1, 3), label="mutations")):
        i = draw.draw(st.integers(0, len(lines) - 1), label="line")
        action = draw.draw(st.sampled_from(["delete", "duplicate", "swap", "truncate", "insert", "indent"]),
                           label="action")
        if action == "delete" and len(lines) > 1:
            del lines[i]
        elif action == "duplicate":  # the same key twice, often
            lines.insert(i, lines[i])
        elif action == "swap":
            j = draw.draw(st.integers(0, len(lines) - 1), label="other line")
            lines[i], lines[j] = lines[j], lines[i]
        elif action == "truncate":
            lines[i] = lines[i][: draw.draw(st.integers(0, len(lines[i])), label="cut")]
        elif action == "insert":
            at = draw.draw(st.integers(0, len(lines[i])), label="at")
            bit = draw.draw(st.sampled_from([": ", "- ", "{", "}", "[", "]", "&a ", "*a", "!!int ", "!!float ",
                                             ".inf", ".nan", "'", '"', "\t", "<<: ", "? ", "0x", "-", "1e400",
                                             "2001-02-30", "!!python/name:os.system "]), label="bit")
            lines[i] = lines[i][:at] + bit + lines[i][at:]
        else:
            lines[i] = "  " + lines[i]
    loads_or_refuses(folder, "\n".join(lines) + "\n")
