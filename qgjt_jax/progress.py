"""Progress lines of long work (embedding a set, preparing a dataset)."""

import sys
import time


class Progress:
  """A plain progress line on stderr, at most every `every_s` seconds, and
  once at the end (`close`)."""

  def __init__(
      self,
      total: int | None,
      desc: str,
      enabled: bool = True,
      every_s: float = 10.0,
  ):
    self.total, self.desc, self.enabled, self.every_s = (
        total,
        desc,
        enabled,
        every_s,
    )
    self.done = 0
    self.start = self.last = time.monotonic()

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.monotonic()
    if self.enabled and now - self.last >= self.every_s:
      self.last = now
      self._write(now)

  def close(self) -> None:
    if self.enabled:
      self._write(time.monotonic())

  def _write(self, now: float) -> None:
    rate = self.done / max(now - self.start, 1e-9)
    if self.total:
      frac = self.done / self.total
      width = 30
      bar = '#' * int(width * frac) + '.' * (width - int(width * frac))
      line = (
          f'{self.desc}: [{bar}] {self.done}/{self.total} '
          f'({100 * frac:.1f}%) {rate:.0f} images/s'
      )
    else:
      line = f'{self.desc}: {self.done} images, {rate:.0f} images/s'
    print(line, file=sys.stderr, flush=True)
