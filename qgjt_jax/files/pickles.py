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
  overflows the interpreter's stack), and hashing keys and members visits
  at most `_MAX_HASH_VISITS` objects over the whole pickle, counted before
  it happens: a hash visits a tuple's items every time they are shared, so
  60 tuples each holding the last twice are a few bytes to build and 2**60
  visits to hash;
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

# What hashing every dict key and set member of one pickle may visit: a
# state dict's keys are strings (one visit each); 16 M is well under a
# second of hashing.
_MAX_HASH_VISITS = 1 << 24


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
    # id -> (object, depth, objects a hash of it visits) of the hashable
    # containers built so far.
    self._nesting = {}
    self._hash_visits = 0

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"it refers to {module}.{name}, which such a file never needs"
    )

  def _declared(self, count: int, opcode: str) -> int:
    if count > self._size:
      raise pickle.UnpicklingError(
          f"its {opcode} declares {count:,} bytes, more than the whole file "
          f"({self._size:,} bytes) holds"
      )
    return count

  def _load_bytearray8(self):
    (count,) = struct.unpack("<Q", self.read(8))
    data = self.read(self._declared(count, "BYTEARRAY8"))
    if len(data) != count:
      raise pickle.UnpicklingError("the file ends inside a BYTEARRAY8")
    self.append(bytearray(data))

  dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

  def _known(self, item: Any) -> tuple[int, int]:
    """(depth, hash visits) of a built object (0 and 1 for a leaf)."""
    found = self._nesting.get(id(item))
    return found[1:] if found is not None and found[0] is item else (0, 1)

  def _nested(self, items, make=tuple):
    """`make(items)` (a tuple or frozenset), refused before anything hashes
    it when it nests deeper than the limit, or when a frozenset's members
    would take the pickle's hashing past its budget."""
    known = [self._known(v) for v in items]
    depth = 1 + max((d for d, _ in known), default=0)
    if depth > self._max_depth:
      raise limits.exceeded(
          self.where, "tuples nested", depth, "max_pickle_depth"
      )
    # Capped: only whether it passes the budget matters.
    visits = min(1 + sum(v for _, v in known), _MAX_HASH_VISITS + 1)
    if make is frozenset:
      self._charge(items)
    container = make(items)
    self._nesting[id(container)] = (container, depth, visits)
    return container

  def _charge(self, keys) -> None:
    """Counts what hashing `keys` visits; refuses past the budget."""
    self._hash_visits += sum(self._known(k)[1] for k in keys)
    if self._hash_visits > _MAX_HASH_VISITS:
      raise pickle.UnpicklingError(
          f"hashing its dict keys and set members would visit more than "
          f"{_MAX_HASH_VISITS:,} objects (tuples that hold the same tuple "
          "many times over): no file of this kind holds such keys"
      )

  def hashing(
      self, make: Callable[..., Any], pairs: bool = False
  ) -> Callable[..., Any]:
    """`make` (set, frozenset, OrderedDict: a callable that hashes the
    items, or with `pairs` the keys, of its one argument) as a file may
    call it, that hashing charged first."""

    def call(*args):
      if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise pickle.UnpicklingError(
            f"it calls {make.__name__} with {len(args)} argument(s) of "
            f"{', '.join(type(a).__name__ for a in args)}, not one list"
        )
      if args:
        items = args[0]
        self._charge(
            [p[0] for p in items if isinstance(p, (list, tuple)) and p]
            if pairs
            else items
        )
      return make(*args)

    return call

  def _load_dict(self):
    items = self.pop_mark()
    self._charge(items[0::2])
    self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

  def _load_setitem(self):
    self._charge(self.stack[-2:-1])
    value, key = self.stack.pop(), self.stack.pop()
    self.stack[-1][key] = value

  def _load_setitems(self):
    items = self.pop_mark()
    self._charge(items[0::2])
    target = self.stack[-1]
    for i in range(0, len(items), 2):
      target[items[i]] = items[i + 1]

  def _load_additems(self):
    items = self.pop_mark()
    self._charge(items)
    target = self.stack[-1]
    for item in items:
      target.add(item)

  dispatch[pickle.DICT[0]] = _load_dict
  dispatch[pickle.SETITEM[0]] = _load_setitem
  dispatch[pickle.SETITEMS[0]] = _load_setitems
  dispatch[pickle.ADDITEMS[0]] = _load_additems

  def _load_tuple(self):
    items = self.pop_mark()  # before self.append: it rebinds it
    self.append(self._nested(items))

  def _load_tuple1(self):
    self.stack[-1] = self._nested(self.stack[-1:])

  def _load_tuple2(self):
    self.stack[-2:] = [self._nested(self.stack[-2:])]

  def _load_tuple3(self):
    self.stack[-3:] = [self._nested(self.stack[-3:])]

  def _load_frozenset(self):
    items = self.pop_mark()
    self.append(self._nested(items, frozenset))

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
        "a file never does"
    )

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
    raise PickleError(
        f"{where}: its pickle asks for more than it can hold "
        f"({type(e).__name__})"
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # Nothing of the file's runs: what fails is the file's.
    raise PickleError(
        f"{where}: not a readable pickle ({type(e).__name__}: "
        f"{str(e)[:200]})"
    ) from None


def walk(
    obj: Any, visit: Callable[[Any, Callable[[Any], Any]], Any], where: str
) -> Any:
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
      raise limits.exceeded(
          where,
          "the nesting of its containers (or a cycle)",
          depth,
          "max_pickle_depth",
      )
    done[key] = (value, busy)
    result = visit(value, lambda v: inner(v, depth + 1))
    done[key] = (value, result)
    return result

  return inner(obj)
