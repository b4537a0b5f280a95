"""PyTorch checkpoints read without torch, from files in torch's own layouts.

The files are written the way torch.save writes them (tests/torch_writer.py),
so the tests need no torch. Where torch happens to be installed, torch.save's
own files are read too.
"""

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from qgjt_jax.interop import torch_files
from tests.helpers.torch_writer import write_torch_file


def _tensors():
  rng = np.random.default_rng(0)
  return collections.OrderedDict(
      [
          ("conv.weight", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
          ("fc.weight", rng.normal(size=(5, 6)).astype(np.float32)),  # 2-D
          ("half", rng.normal(size=(7,)).astype(np.float16)),
          ("bf16", rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16)),
          ("double", rng.normal(size=(3,))),
          ("bn.num_batches_tracked", np.array(12, np.int64)),
          ("mask", np.array([True, False])),
      ]
  )


def _assert_state(got, want):
  assert list(got) == list(want)
  for name, array in want.items():
    floating = array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16
    assert got[name].dtype == (np.float32 if floating else array.dtype), name
    np.testing.assert_array_equal(
        got[name], array.astype(got[name].dtype), err_msg=name
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dicts_in_both_layouts(tmp_path, legacy):
  path = tmp_path / "model.pth"
  write_torch_file(path, _tensors(), legacy=legacy)
  _assert_state(torch_files.state_dict(path), _tensors())


def test_a_lightning_checkpoint_keeps_other_objects_out(tmp_path):
  """Hyper-parameters may hold any class: they are not needed, never
  imported, and do not stop the read."""
  import argparse  # pylint: disable=g-import-not-at-top

  path = tmp_path / "model.ckpt"
  write_torch_file(
      path,
      {
          "state_dict": _tensors(),
          "epoch": 7,
          "hyper_parameters": {
              "args": argparse.Namespace(lr=0.1),
              "other": collections.Counter("ab"),
          },
      },
  )
  _assert_state(torch_files.state_dict(path), _tensors())
  loaded = torch_files.load(path)
  assert loaded["epoch"] == 7 and loaded["hyper_parameters"]["args"].lr == 0.1
  other = loaded["hyper_parameters"]["other"]
  assert isinstance(other, torch_files.Opaque)
  assert other.name == "collections.Counter"


class _RunsCode:
  """What a malicious pickle does: call os.system on load."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_code_in_a_pickle_never_runs_and_is_named(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  write_torch_file(
      path, {"weight": np.zeros(2, np.float32), "payload": _RunsCode(marker)}
  )
  with pytest.raises(
      torch_files.TorchFileError,
      match=r"evil.pth: .*refers to posix.system, which no "
      r"checkpoint needs",
  ):
    torch_files.state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"just some text\n", "is not a PyTorch checkpoint"),
        (pickle.dumps({"a": 1}, protocol=2), "no torch.save magic number"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, words):
  path = tmp_path / "garbage.pth"
  path.write_bytes(content)
  with pytest.raises(torch_files.TorchFileError, match=words) as e:
    torch_files.state_dict(path)
  assert "garbage.pth" in str(e.value)


def test_damaged_and_missing_files(tmp_path):
  path = tmp_path / "model.pth"
  write_torch_file(path, _tensors())
  with zipfile.ZipFile(path) as archive:  # drop one storage member
    members = {n: archive.read(n) for n in archive.namelist()}
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      if name != "model/data/1":
        archive.writestr(name, data)
  with pytest.raises(torch_files.TorchFileError, match="model.pth: .*damaged"):
    torch_files.state_dict(path)
  legacy = tmp_path / "legacy.pth"
  write_torch_file(legacy, _tensors(), legacy=True)
  legacy.write_bytes(legacy.read_bytes()[:-10])  # the last storage cut short
  with pytest.raises(
      torch_files.TorchFileError, match="legacy.pth: storage .* cut short"
  ):
    torch_files.state_dict(legacy)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_files.state_dict(tmp_path / "nope.pth")
  empty = tmp_path / "empty.pth"
  write_torch_file(empty, {"epoch": 3})
  with pytest.raises(torch_files.TorchFileError, match="holds no tensors"):
    torch_files.state_dict(empty)


def test_files_written_by_torch_itself(tmp_path):
  torch = pytest.importorskip("torch")
  want = _tensors()
  tensors = collections.OrderedDict(
      (
          k,
          torch.from_numpy(
              np.asarray(
                  v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
              )
          ),
      )
      for k, v in want.items()
  )
  tensors["bf16"] = tensors["bf16"].to(torch.bfloat16)
  tensors["fc.weight"] = tensors["fc.weight"].t().contiguous().t()
  for legacy in (False, True):
    path = tmp_path / f"torch_{legacy}.pth"
    torch.save(
        {"state_dict": tensors}, path, _use_new_zipfile_serialization=not legacy
    )
    _assert_state(torch_files.state_dict(path), want)
