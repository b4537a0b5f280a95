"""The one reader of pickles from users' files (`.pth`/`.ckpt`, `.bin` sets).

A pickle is a program for a small stack machine; unpickling a stranger's
file with the standard reader can run any code it names and allocate
whatever it declares. `RestrictedUnpickler` is the pure-Python reader (the C
one grows its memo to whatever index a 12-byte pickle names) with what a
file can make it do bounded, before anything is allocated:

* names resolve only through the subclass's `find_class` (none by
  default), and BUILD (setting an object's state) is refused unless the
  subclass allows it;
* a length-prefixed opcode may not declare more bytes than the whole file
  holds (BYTEARRAY8 would zero-fill 4 GiB for a 12-byte file), and reads
  never ask the file for more than is left (`limits.BoundedReader`);
* tuples and frozensets, the containers a dict key or set member can be,
  may nest no deeper than `max_pickle_depth` (hashing a 300,000-deep tuple
  overflows the interpreter's stack);
* whatever fails while reading is the file's: `PickleError` naming it.

What the objects mean (tensors, images) is the subclass's and its caller's
to check; `walk` visits a structure once per object, so objects shared
through the memo are never expanded into copies.
"""
from __future__ import annotations

import pickle
import struct
from typing import Any, Callable

from qgjt_jax import errors
from qgjt_jax.files import limits


class PickleError(errors.UserError, ValueError):
  """A pickle that cannot be read safely (the message names the file)."""


class RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler, bounded as the module says.

  Args:
    file: a binary file positioned at the pickle.
    size: the bytes of the file that belong to the pickle (at most).
    where: the file, as messages name it.
    **kwargs: for pickle's Unpickler (encoding, errors).
  """
  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, size: int, where: str, **kwargs):
    super().__init__(limits.BoundedReader(file, size), **kwargs)
    self.where = where
    self._size = size
    self._max_depth = limits.current().max_pickle_depth
    self._nesting = {}  # id -> (object, depth) of hashable containers

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"it refers to {module}.{name}, which such a file never needs")

  def _declared(self, count: int, opcode: str) -> int:
    if count > self._size:
      raise pickle.UnpicklingError(
          f"its {opcode} declares {count:,} bytes, more than the whole file "
          f"({self._size:,} bytes) holds")
    return count

  def _load_bytearray8(self):
    (count,) = struct.unpack("<Q", self.read(8))
    data = self.read(self._declared(count, "BYTEARRAY8"))
    if len(data) != count:
      raise pickle.UnpicklingError("the file ends inside a BYTEARRAY8")
    self.append(bytearray(data))
  dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

  def _depth(self, item: Any) -> int:
    found = self._nesting.get(id(item))
    return found[1] if found is not None and found[0] is item else 0

  def _nested(self, container):
    """Records how deep a new tuple or frozenset nests; refuses one deeper
    than the limit, before anything hashes it."""
    depth = 1 + max((self._depth(v) for v in container), default=0)
    if depth > self._max_depth:
      raise limits.exceeded(self.where, "tuples nested", depth,
                            "max_pickle_depth")
    self._nesting[id(container)] = (container, depth)
    return container

  def _load_tuple(self):
    items = self.pop_mark()  # before self.append: it rebinds it
    self.append(self._nested(tuple(items)))

  def _load_tuple1(self):
    self.stack[-1] = self._nested((self.stack[-1],))

  def _load_tuple2(self):
    self.stack[-2:] = [self._nested((self.stack[-2], self.stack[-1]))]

  def _load_tuple3(self):
    self.stack[-3:] = [self._nested((self.stack[-3], self.stack[-2],
                                     self.stack[-1]))]

  def _load_frozenset(self):
    items = self.pop_mark()
    self.append(self._nested(frozenset(items)))

  dispatch[pickle.TUPLE[0]] = _load_tuple
  dispatch[pickle.TUPLE1[0]] = _load_tuple1
  dispatch[pickle.TUPLE2[0]] = _load_tuple2
  dispatch[pickle.TUPLE3[0]] = _load_tuple3
  dispatch[pickle.FROZENSET[0]] = _load_frozenset

  def build(self, target: Any, state: Any) -> None:
    """BUILD: set `target`'s state; subclasses allow what their files
    need."""
    raise pickle.UnpicklingError(
        f"it sets the state of a {type(target).__name__} object, which such "
        "a file never does")

  def _load_build(self):
    state = self.stack.pop()
    self.build(self.stack[-1], state)
  dispatch[pickle.BUILD[0]] = _load_build


def load(unpickler: RestrictedUnpickler) -> Any:
  """`unpickler.load()`, whatever fails there (a bad opcode, a cut file, a
  call with wrong arguments) reported as the file's.

  Raises:
    limits.LimitError: a limit was reached (naming the file).
    PickleError: anything else (naming the file).
  """
  where = unpickler.where
  try:
    return unpickler.load()
  except limits.LimitError:
    raise
  except (MemoryError, RecursionError) as e:
    raise PickleError(f"{where}: its pickle asks for more than it can hold "
                      f"({type(e).__name__})") from None
  except Exception as e:  # pylint: disable=broad-except
    # Nothing of the file's runs: what fails is the file's.
    raise PickleError(f"{where}: not a readable pickle ({type(e).__name__}: "
                      f"{str(e)[:200]})") from None


def walk(obj: Any, visit: Callable[[Any, Callable[[Any], Any]], Any],
         where: str) -> Any:
  """`visit(obj, inner)` with `inner` the same walk one level down, each
  object visited once: an object reached again (shared through the memo,
  or a cycle) gives its first result, so a structure of n objects costs n
  visits however often they are shared. Deeper than max_pickle_depth is
  refused."""
  done: dict[int, Any] = {}
  limit = limits.current().max_pickle_depth
  busy = object()

  def inner(value, depth=0):
    key = id(value)
    if key in done:
      if done[key][1] is busy:
        depth = limit + 1  # a cycle: as deep as it goes
      else:
        return done[key][1]
    if depth > limit:
      raise limits.exceeded(where, "the nesting of its containers (or a "
                            "cycle)", depth, "max_pickle_depth")
    done[key] = (value, busy)
    result = visit(value, lambda v: inner(v, depth + 1))
    done[key] = (value, result)
    return result

  return inner(obj)
