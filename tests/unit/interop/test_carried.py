"""What exports carry beyond the weights is read back only when it adds up.

The records are made by the project's own producers (thresholds and open-set
rows from scores, `decisions.exported` of a stored evaluation), then altered
as a downloaded file could be.
"""

import copy
import json

import numpy as np
import pytest

from qgjt_jax.eval import extract
from qgjt_jax.eval import identification
from qgjt_jax.eval import thresholds
from qgjt_jax.inference import decisions
from qgjt_jax.interop import carried

_PEOPLE, _PHOTOS = 20, 6


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
  """An exported file's metadata, from a stored evaluation of 20 people."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(_PEOPLE), _PHOTOS)
  centres = rng.normal(size=(_PEOPLE, 32))
  feats = centres[labels] + 0.8 * rng.normal(size=(len(labels), 32))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  first, second = np.triu_indices(len(labels), 1)
  scores = np.sum(feats[first] * feats[second], axis=1)
  same = labels[first] == labels[second]
  metrics = {
      "thresholds": thresholds.at_far(
          scores[same],
          scores[~same],
          impostor_people=(labels[first][~same], labels[second][~same]),
      ),
      "open_set": identification.open_set_calibration(feats, labels),
      "impostor_pairs": int((~same).sum()),
      "num_images": len(labels),
      "provenance": {
          "kind": "calibration",
          "folder": "/data/people",
          "scoring": extract.DECISION_SCORING,
          "step": 7,
      },
  }
  workdir = tmp_path_factory.mktemp("run")
  (workdir / "eval").mkdir()
  (workdir / "eval" / "step_7.json").write_text(
      json.dumps({"calibration_people": metrics}, default=float)
  )
  measured = decisions.exported(str(workdir), 7)
  return {
      carried.THRESHOLDS_KEY: json.dumps(measured),
      carried.QUALITY_KEY: carried.quality_record(
          {"mean": 21.5, "std": 3.25}, 0.333, 1e-3, 0.4
      ),
  }


def test_a_sound_record_is_read_back_whole(metadata):
  read = carried.read(metadata, "m.safetensors")
  assert read.norm_stats() == {"mean": 21.5, "std": 3.25}
  assert read.settings() == {
      "quality.h": 0.333,
      "quality.eps": 1e-3,
      "head.b": 0.4,
  }
  stored = json.loads(metadata[carried.THRESHOLDS_KEY])["sets"][
      "calibration_people"
  ]
  evaluation = read.evaluation("m.safetensors")["calibration_people"]
  assert evaluation["thresholds"] and evaluation["open_set"]
  for key in ("thresholds", "open_set"):
    for got, want in zip(evaluation[key], stored[key]):
      assert {k: got[k] for k in got} == {k: want[k] for k in got}
  assert evaluation["provenance"] == {
      "kind": "calibration",
      "scoring": extract.DECISION_SCORING,
      "step": 7,
      "carried_from": "m.safetensors",
  }  # the local folder stays behind
  assert carried.read({}, "m.onnx") == carried.Carried()


def _altered(metadata, change):
  record = json.loads(metadata[carried.THRESHOLDS_KEY])
  entry = record["sets"]["calibration_people"]
  change(entry, entry["thresholds"][0], entry["open_set"][0])
  return {**metadata, carried.THRESHOLDS_KEY: json.dumps(record)}


def _set(where, key, value):
  where[key] = value


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda e, far, fpir: _set(far, "cosine", -1.5), ["cosine", "-1.5"]),
        (lambda e, far, fpir: _set(far, "cosine", float("nan")), ["cosine"]),
        (
            lambda e, far, fpir: _set(far, "accepted", far["impostors"] + 1),
            ["accepted", "above the FAR"],
        ),
        (
            lambda e, far, fpir: _set(far, "impostors", 10**9),
            ["impostors", "exceeds the set's impostor pairs"],
        ),
        (
            lambda e, far, fpir: _set(e, "impostor_pairs", 10**9),
            ["impostor_pairs", "120 photos"],
        ),
        (lambda e, far, fpir: _set(far, "far", 0), ["far", "(0, 1]"]),
        (
            lambda e, far, fpir: _set(far, "far_upper", 0.5),
            ["far_upper", "0.5"],
        ),
        (lambda e, far, fpir: _set(far, "accepted", "3"), ["accepted", "'3'"]),
        (lambda e, far, fpir: far.pop("cosine"), ["cosine", "None"]),
        (lambda e, far, fpir: _set(fpir, "false_alarms", -1), ["false_alarms"]),
        (lambda e, far, fpir: _set(fpir, "fpir", 2), ["fpir", "2"]),
        (
            lambda e, far, fpir: _set(e["provenance"], "kind", "anything"),
            ["provenance.kind"],
        ),
        (
            lambda e, far, fpir: _set(e, "thresholds", {"a": 1}),
            ["thresholds", "not a list"],
        ),
    ],
    ids=[
        "cosine",
        "nan",
        "accepted",
        "impossible_pairs",
        "set_pairs",
        "far_zero",
        "interval",
        "string_count",
        "missing",
        "negative_alarms",
        "fpir",
        "kind",
        "rows",
    ],
)
def test_thresholds_that_do_not_add_up_are_refused(metadata, change, words):
  with pytest.raises(carried.CarriedRecordError) as raised:
    carried.read(_altered(metadata, change), "/d/m.safetensors")
  message = str(raised.value)
  assert message.startswith("/d/m.safetensors: ") and "\n" not in message
  for word in words:
    assert word in message, (word, message)


@pytest.mark.parametrize(
    "key, text, words",
    [
        (
            carried.THRESHOLDS_KEY,
            "[" * 100_000 + "]" * 100_000,
            ["not readable"],
        ),
        (carried.THRESHOLDS_KEY, "{not json", ["not readable"]),
        (carried.THRESHOLDS_KEY, "x" * (5 << 20), ["characters"]),
        (
            carried.THRESHOLDS_KEY,
            json.dumps({"sets": {}, "scoring": "raw"}),
            ["scoring"],
        ),
        (
            carried.QUALITY_KEY,
            json.dumps(
                {"mean": 20, "std": -1, "h": 0.3, "eps": 1e-3, "b": 0.2}
            ),
            ["std"],
        ),
        (
            carried.QUALITY_KEY,
            json.dumps({"mean": 20, "std": 1}),
            ["h", "None"],
        ),
        (carried.QUALITY_KEY, json.dumps([1, 2]), ["not a mapping"]),
    ],
    ids=["deep", "broken", "huge", "scoring", "std", "missing", "list"],
)
def test_records_that_are_no_records_are_refused(metadata, key, text, words):
  with pytest.raises(carried.CarriedRecordError) as raised:
    carried.read({**metadata, key: text}, "m.onnx")
  for word in words:
    assert word in str(raised.value), (word, str(raised.value))


def test_the_record_is_not_changed_by_reading(metadata):
  before = copy.deepcopy(metadata)
  carried.read(metadata, "m.safetensors")
  assert metadata == before
