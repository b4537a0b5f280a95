"""The restricted reader of pickles: names, lengths and nesting bounded."""

import io
import pickle

import pytest

from qgjt_jax.files import limits
from qgjt_jax.files import pickles
from tests.helpers import hostile


def _load(program: bytes):
  return pickles.load(
      pickles.RestrictedUnpickler(io.BytesIO(program), len(program), "the.pkl")
  )


def test_plain_values_load_and_names_do_not():
  value = {"a": [1, 2.5, b"x", (1, (2, 3))], "b": frozenset({1})}
  for protocol in (4, 5):  # (2 pickles bytes and frozensets by name)
    assert _load(pickle.dumps(value, protocol=protocol)) == value
  with pytest.raises(pickles.PickleError, match="the.pkl.*collections"):
    _load(pickle.dumps(__import__("collections").OrderedDict()))


def test_a_length_no_file_could_back_is_refused_before_allocating():
  with pytest.raises(
      pickles.PickleError, match="BYTEARRAY8 declares 4,294,967,296 bytes"
  ):
    _load(hostile.bytearray8())
  ok = pickle.dumps(bytearray(b"abc"), protocol=5)
  assert _load(ok) == bytearray(b"abc")


def test_tuples_nest_no_deeper_than_the_limit():
  with pytest.raises(limits.LimitError, match="the.pkl: tuples nested"):
    _load(hostile.deep_tuple_key(300_000))
  shallow = (((),),)
  assert _load(pickle.dumps({shallow: 1}, protocol=2)) == {shallow: 1}


def test_walk_visits_each_shared_object_once():
  shared = _load(hostile.shared_lists(40))  # 2**40 leaves as a tree
  visits = []

  def visit(value, inner):
    visits.append(id(value))
    return [inner(v) for v in value] if isinstance(value, list) else value

  out = pickles.walk(shared, visit, "the.pkl")
  assert len(visits) == 41  # one per list
  assert out[0] is out[1]  # still shared, not copied
  cycle = []
  cycle.append(cycle)
  with pytest.raises(limits.LimitError, match="a cycle"):
    pickles.walk(cycle, visit, "the.pkl")


@pytest.mark.parametrize("use", ["key", "keys", "member", "frozenset"])
def test_shared_tuples_are_never_hashed_past_the_budget(use):
  """60 tuples, each the one before twice: fine to build, 2**60 visits to
  hash as a dict key or set member. Refused before hashing (this test
  would not end otherwise)."""
  with pytest.raises(
      pickles.PickleError, match="the.pkl.*would visit more than 16,777,216"
  ):
    _load(hostile.shared_tuples(use))
  small = _load(hostile.shared_tuples(use, depth=8))  # 2**8: hashed
  assert small is not None


@pytest.mark.parametrize("use", ["set", "ordered_dict"])
def test_allowed_callables_that_hash_are_charged_too(use):
  from qgjt_jax.interop import torch_files  # pylint: disable=g-import-not-at-top

  def load(program):
    return pickles.load(
        torch_files._Unpickler(  # pylint: disable=protected-access
            io.BytesIO(program), len(program), "the.pth"
        )
    )

  with pytest.raises(pickles.PickleError, match="the.pth.*would visit"):
    load(hostile.shared_tuples(use))
  assert len(load(hostile.shared_tuples(use, depth=8))) == 1
