"""Which threshold a decision may use, and what it says about it."""

import hashlib
import json

import numpy as np
import pytest

from qgjt_jax.eval import extract
from qgjt_jax.eval import own_data
from qgjt_jax.eval import report
from qgjt_jax.inference import decisions

FUSED = extract.DECISION_SCORING


def _row(far, cosine, n):
  """A row cut where its bound over 40 people holds, below the target."""
  return {
      "far": far,
      "cosine": cosine,
      "tar": 0.5,
      "genuine": 100,
      "impostors": n,
      "accepted": int(far * n / 2),
      "far_upper": 0.9 * far,
      "design_effect": 2.0,
      "people": 40,
  }


def _write(workdir, name, sets):
  folder = workdir / "eval"
  folder.mkdir(exist_ok=True)
  (folder / name).write_text(json.dumps(sets))


def _sets(**kinds):
  """{set: metrics} with thresholds at 1e-2 and 1e-3 where `n` impostors
  resolve them; kinds maps a set name to (kind, n)."""
  return {
      name: {
          "accuracy_mean": 0.9,
          "impostor_pairs": n,
          "provenance": {"kind": kind, "scoring": FUSED, "step": 0},
          "thresholds": [
              _row(far, cosine, n)
              for far, cosine in ((1e-2, 0.3), (1e-3, 0.4))
              if n * far >= 3
          ],
      }
      for name, (kind, n) in kinds.items()
  }


def test_photos_of_the_weights_step_decide_best_kind_first(tmp_path):
  _write(tmp_path, "step_10.json", _sets(lfw=("bin", 6000)))
  _write(
      tmp_path,
      "step_20.json",
      _sets(
          lfw=("bin", 6000),
          folder_mine=("own_folder", 4000),
          synthetic_hq_hq=("generated", 90_000),
      ),
  )
  chosen, notes = decisions.at_far(str(tmp_path), 20, 1e-3)
  assert (chosen.set_name, chosen.step, notes) == ("folder_mine", 20, [])
  assert "your own folder of people" in chosen.describe()
  assert (
      "FAR <= 1e-03 at 95% confidence over 40 people (bound 9.0e-04; "
      "measured 5.0e-04, 2 of 4,000 impostor pairs accepted)"
  ) in (chosen.describe())
  # Step 10's own evaluation, though a newer one exists.
  chosen, notes = decisions.at_far(str(tmp_path), 10, 1e-3)
  assert (chosen.set_name, chosen.step, notes) == ("lfw", 10, [])
  # A step never evaluated: the newest evaluation, with a warning.
  chosen, notes = decisions.at_far(str(tmp_path), 30, 1e-2)
  assert chosen.step == 20 and "no evaluation of step 30" in notes[0]


def test_generated_faces_and_templates_decide_only_when_named(tmp_path):
  _write(
      tmp_path,
      "step_5.json",
      _sets(synthetic_hq_hq=("generated", 5000), ijbc=("ijb_template", 90_000)),
  )
  with pytest.raises(decisions.DecisionError) as refused:
    decisions.at_far(str(tmp_path), 5, 1e-3)
  message = str(refused.value)
  assert "only on IJB templates (pooled photos) and generated faces" in (
      message
  )
  assert "calibration_folders" in message and "--threshold_set" in message
  chosen, _ = decisions.at_far(str(tmp_path), 5, 1e-3, "synthetic_hq_hq")
  assert "generated faces, not single photos" in chosen.describe()


def test_too_few_impostors_say_how_many_are_needed(tmp_path):
  _write(tmp_path, "step_5.json", _sets(pairs_mine=("own_pairs", 20)))
  assert not json.loads((tmp_path / "eval" / "step_5.json").read_text())[
      "pairs_mine"
  ][
      "thresholds"
  ]  # 20 resolve no FAR
  with pytest.raises(
      decisions.DecisionError,
      match=r"FAR 1e-02 needs 300 impostor pairs; pairs_mine "
      r"\(step_5.json\) has 20",
  ):
    decisions.at_far(str(tmp_path), 5, 1e-2)
  _write(tmp_path, "step_6.json", _sets(pairs_mine=("own_pairs", 500)))
  with pytest.raises(
      decisions.DecisionError, match="needs 30,000 impostor pairs.*--far=1e-02"
  ):
    decisions.at_far(str(tmp_path), 6, 1e-4)


def test_thresholds_of_other_scores_are_refused(tmp_path):
  sets = _sets(lfw=("bin", 6000))
  sets["lfw"]["provenance"]["scoring"] = extract.scoring_name(None)
  _write(tmp_path, "step_5.json", sets)
  with pytest.raises(decisions.DecisionError, match="one view scores"):
    decisions.at_far(str(tmp_path), 5, 1e-3)
  del sets["lfw"]["provenance"]
  _write(tmp_path, "step_6.json", sets)
  with pytest.raises(decisions.DecisionError, match="older evaluation"):
    decisions.at_far(str(tmp_path), 6, 1e-3)


def test_no_evaluation_or_bad_values_are_one_clear_line(tmp_path):
  with pytest.raises(decisions.DecisionError, match="calibration_folders"):
    decisions.at_far(str(tmp_path), 1, 1e-3)
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "step_5.json").write_text("{not json")
  with pytest.raises(decisions.DecisionError, match="not a readable"):
    decisions.at_far(str(tmp_path), 5, 1e-3)
  for far in (0, -1, 1, float("nan"), float("inf")):
    with pytest.raises(decisions.DecisionError, match="between 0 and 1"):
      decisions.at_far(str(tmp_path), 5, far)
  for cosine in (1.5, float("nan")):
    with pytest.raises(decisions.DecisionError, match="between -1 and 1"):
      decisions.by_hand(cosine)
  assert decisions.by_hand(0.3).describe() == (
      "threshold 0.3000, given by --threshold"
  )


def test_open_set_thresholds_and_what_a_gallery_expects(tmp_path):
  row = {
      "fpir": 0.01,
      "cosine": 0.55,
      "searches": 1200,
      "false_alarms": 6,
      "fpir_upper": 0.0095,
      "design_effect": 1.5,
      "people": 60,
      "gallery_people": 59,
      "template_false_match_rate": 2e-4,
  }
  (tmp_path / "people" / "ann").mkdir(parents=True)
  (tmp_path / "people" / "bob").mkdir()
  _write(
      tmp_path,
      "step_3.json",
      {
          "calibration_people": {
              "open_set": [row],
              "num_images": 1200,
              "provenance": {
                  "kind": "calibration",
                  "scoring": FUSED,
                  "step": 3,
                  "folder": str(tmp_path / "people"),
              },
          }
      },
  )
  chosen, _ = decisions.at_fpir(str(tmp_path), 3, 0.01)
  assert chosen.cosine == 0.55
  assert (
      "FPIR <= 0.01 at 95% confidence over 60 people (bound 9.5e-03; "
      "measured 5.0e-03, 6 of 1,200 non-mated searches raising a false "
      "alarm) against galleries of 59 people"
  ) in chosen.describe()
  assert decisions.calibration_people(chosen) == {"ann", "bob"}
  with pytest.raises(
      decisions.DecisionError,
      match="FPIR 0.0001 needs 30,000 non-mated searches",
  ):
    decisions.at_fpir(str(tmp_path), 3, 1e-4)
  # Exports carry every row with its provenance, but no local path.
  exported = decisions.exported(str(tmp_path), 3)
  kept = exported["sets"]["calibration_people"]
  assert kept["open_set"] == [row]
  assert kept["provenance"] == {
      "kind": "calibration",
      "scoring": FUSED,
      "step": 3,
  }
  assert exported["scoring"] == FUSED and exported["step"] == 3


def _tampered(change):
  sets = _sets(folder_mine=("own_folder", 4000))
  sets["folder_mine"]["num_images"] = 100
  sets["folder_mine"]["open_set"] = [
      {
          "fpir": 0.1,
          "cosine": 0.35,
          "searches": 100,
          "false_alarms": 10,
          "people": 10,
          "gallery_people": 9,
          "template_false_match_rate": 0.01,
          "tpir": 0.9,
      }
  ]
  change(sets["folder_mine"])
  return sets


def _set(where, key, value):
  where[key] = value


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda s: s["thresholds"][1].update(
                cosine=-1, accepted=0, impostors=10**9
            ),
            ["impostors", "1,000,000,000", "exceeds"],
        ),
        (
            lambda s: _set(s["thresholds"][1], "cosine", float("nan")),
            ["cosine"],
        ),
        (lambda s: _set(s["thresholds"][1], "cosine", 2), ["cosine", "2"]),
        (lambda s: _set(s["thresholds"][1], "accepted", "2"), ["accepted"]),
        (
            lambda s: _set(s["thresholds"][1], "far_upper", 0.5),
            ["far_upper", "0.5", "0.001]"],
        ),
        (lambda s: _set(s["thresholds"][1], "people", 3), ["people", "3"]),
        (
            lambda s: _set(s["thresholds"][1], "accepted", 40),
            ["accepted", "above the FAR"],
        ),
        (lambda s: s["thresholds"][1].pop("far"), ["far", "None"]),
        (
            lambda s: _set(s, "impostor_pairs", 10**9),
            ["impostor_pairs", "100 photos"],
        ),
        (
            lambda s: _set(s["open_set"][0], "template_false_match_rate", -35),
            ["template_false_match_rate"],
        ),
        (lambda s: _set(s["thresholds"], 0, "row"), ["is not a row"]),
    ],
    ids=[
        "claimed_pairs",
        "nan",
        "two",
        "string",
        "bound_above",
        "few_people",
        "above_rate",
        "no_far",
        "set_pairs",
        "negative_rate",
        "row",
    ],
)
def test_stored_thresholds_that_do_not_add_up_decide_nothing(
    tmp_path, change, words
):
  """A downloaded workdir's stored evaluation is believed only where its
  numbers add up: the file and field are named, and nothing decides."""
  _write(tmp_path, "step_5.json", _tampered(change))
  with pytest.raises(decisions.DecisionError) as refused:
    decisions.at_far(str(tmp_path), 5, 1e-3)
    decisions.at_fpir(str(tmp_path), 5, 0.1)
  message = str(refused.value)
  assert "step_5.json: folder_mine." in message and "\n" not in message
  for word in words:
    assert word in message, (word, message)
  with pytest.raises(decisions.DecisionError):
    decisions.exported(str(tmp_path), 5)  # nor is it exported


def test_a_sound_stored_set_still_decides_and_exports(tmp_path):
  _write(tmp_path, "step_5.json", _tampered(lambda s: None))
  assert decisions.at_far(str(tmp_path), 5, 1e-3)[0].cosine == 0.4
  assert decisions.at_fpir(str(tmp_path), 5, 0.1)[0].cosine == 0.35
  assert (
      decisions.exported(str(tmp_path), 5)["sets"]["folder_mine"]["thresholds"][
          1
      ]["cosine"]
      == 0.4
  )


def test_stored_files_that_are_no_results(tmp_path):
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "step_5.json").write_text("[" * 100_000)
  with pytest.raises(
      decisions.DecisionError,
      match="step_5.json: not a readable evaluation result",
  ):
    decisions.at_far(str(tmp_path), 5, 1e-3)
  (tmp_path / "eval" / "step_5.json").unlink()
  (tmp_path / "eval" / "step_5.json").symlink_to("/dev/zero")
  with pytest.raises(Exception, match="not a regular file"):
    decisions.at_far(str(tmp_path), 5, 1e-3)


def test_rates_outside_the_grid_name_the_grid_and_the_coarsest(tmp_path):
  _write(tmp_path, "step_5.json", _sets(folder_mine=("own_folder", 4000)))
  with pytest.raises(
      decisions.DecisionError,
      match=r"--far=0.05: "
      r"evaluations store thresholds at 1e-02, 1e-03, .* "
      r"only; use --far=1e-02, the coarsest",
  ):
    decisions.at_far(str(tmp_path), 5, 0.05)
  with pytest.raises(
      decisions.DecisionError,
      match=r"FAR 1e-04 needs "
      r"30,000 impostor pairs.* has 4,000: use --far=1e-02",
  ):
    decisions.at_far(str(tmp_path), 5, 1e-4)


def test_a_threshold_is_used_on_faces_made_as_it_was_measured(tmp_path):
  """Measured on detected, aligned faces: refused for resized photos, used
  for detected or landmark-aligned ones; and the reverse."""
  sets = _sets(folder_mine=("own_folder", 4000))
  sets["folder_mine"]["provenance"]["align"] = "detect"
  sets["folder_mine"]["num_people"] = 40
  _write(tmp_path, "step_5.json", sets)
  with pytest.raises(
      decisions.DecisionError,
      match=(
          r"folder_mine \(step_5.json\) measured its thresholds on photos whose "
          r"faces were found and aligned .* images resized as they are.*"
          r"--align=detect or --landmarks"
      ),
  ):
    decisions.at_far(str(tmp_path), 5, 1e-3, align="none")
  for align in ("detect", "landmarks"):
    chosen, _ = decisions.at_far(str(tmp_path), 5, 1e-3, align=align)
  assert chosen.describe().endswith(
      "; TAR 0.500 there (100 genuine pairs), 40 people in the set"
  )
  sets["folder_mine"]["provenance"]["align"] = "none"
  _write(tmp_path, "step_6.json", sets)
  with pytest.raises(decisions.DecisionError, match="config.eval.align=detect"):
    decisions.at_far(str(tmp_path), 6, 1e-3, align="detect")
  assert decisions.at_far(str(tmp_path), 6, 1e-3, align="none")[0]


def test_a_calibration_that_does_not_tell_people_apart_is_refused(tmp_path):
  """Photos of noise: the threshold at FAR 1e-2 accepts about as many
  genuine pairs as impostors (TAR 0.011)."""
  sets = _sets(calibration_noise=("calibration", 4000))
  for row in sets["calibration_noise"]["thresholds"]:
    row["tar"] = 1.1 * row["far"]
  _write(tmp_path, "step_5.json", sets)
  with pytest.raises(
      decisions.DecisionError,
      match=(
          r"calibration_noise \(step_5.json\) does not tell its people apart: "
          r"TAR 0.011 at FAR 0.01, within 2x of chance"
      ),
  ):
    decisions.at_far(str(tmp_path), 5, 1e-2)


def _calibrated(tmp_path, people=31, photos=4, dim=8):
  """An evaluation of a folder of `people`, written as evaluation writes
  it (`report.write_results`), its photos stored as searches."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(people), photos)
  feats = rng.normal(size=(people, dim))[labels] + rng.normal(
      size=(len(labels), dim)
  )
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  metrics = own_data.folder_metrics(feats, np.ones(len(labels)), labels)
  metrics["provenance"] = {"kind": "calibration", "scoring": FUSED, "step": 5}
  report.write_results(str(tmp_path), "step_5", {"calibration_p": metrics})
  return feats, labels


def test_identify_measures_its_threshold_against_the_gallery_searched(tmp_path):
  """The stored photos come back as written; cut against a gallery, the
  threshold is the one of their best scores there, bounded over people."""
  feats, labels = _calibrated(tmp_path)
  chosen, _ = decisions.at_fpir(str(tmp_path), 5, 0.05)
  searches = decisions.stored_searches(str(tmp_path), chosen, 8)
  np.testing.assert_array_equal(searches.embeddings, feats.astype(np.float32))
  np.testing.assert_array_equal(searches.people, labels)
  gallery = np.random.default_rng(1).normal(size=(300, 8))
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  best = (searches.embeddings @ gallery.T).max(axis=1)
  cut = decisions.on_gallery(chosen, searches, best, 300)
  assert cut.on_gallery and cut.row["gallery_people"] == 300
  assert cut.row["false_alarms"] == np.sum(best >= cut.cosine)
  assert cut.row["fpir_upper"] <= 0.05 and cut.row["people"] == 31
  assert "against this gallery of 300 people" in cut.describe()
  # Bigger than the calibration's galleries: more false alarms to cut.
  assert cut.cosine > chosen.cosine
  # Exports carry the thresholds, not the workdir's stored photos.
  assert (
      "searches"
      not in decisions.exported(str(tmp_path), 5)["sets"]["calibration_p"]
  )


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: d[:-4] + b"\0\0\0\0", ["SHA-256 differs"]),
        (lambda d: b"", ["SHA-256 differs"]),
    ],
)
def test_stored_searches_that_are_not_what_evaluation_wrote(
    tmp_path, damage, words
):
  _calibrated(tmp_path)
  chosen, _ = decisions.at_fpir(str(tmp_path), 5, 0.05)
  path = tmp_path / "eval" / chosen.searches["file"]
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(decisions.DecisionError) as refused:
    decisions.stored_searches(str(tmp_path), chosen, 8)
  for word in words:
    assert word in str(refused.value)


def test_stored_searches_declaring_vast_arrays_and_none_stored(tmp_path):
  """The digest altered with the file: the header is checked before numpy
  allocates what it declares. A file gone: the calibration's threshold."""
  _calibrated(tmp_path)
  chosen, _ = decisions.at_fpir(str(tmp_path), 5, 0.05)
  path = tmp_path / "eval" / chosen.searches["file"]
  lying = path.read_bytes().replace(b"(124, 8)", b"(124000000000, 8)")
  path.write_bytes(lying)
  record = tmp_path / "eval" / "step_5.json"
  record.write_text(
      record.read_text().replace(
          chosen.searches["sha256"], hashlib.sha256(lying).hexdigest()
      )
  )
  chosen, _ = decisions.at_fpir(str(tmp_path), 5, 0.05)
  with pytest.raises(decisions.DecisionError, match="not the float32"):
    decisions.stored_searches(str(tmp_path), chosen, 8)
  path.unlink()  # none stored: identify keeps the calibration's threshold
  assert decisions.stored_searches(str(tmp_path), chosen, 8) is None
