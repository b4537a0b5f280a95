"""Small evaluation sets in the public layouts, with known designs.

Each image is a 2 x 2 grid of flat colours: its "design feature" is the
twelve quadrant colours around 128, which `quadrant_features` reads back, so
a test can score a tree with a pixel model and compare with an oracle.
"""

import itertools
import pathlib
import pickle

import cv2
import numpy as np

from qgjt_jax.align import five_points

SIZE = 16  # side of the TinyFace and SCface images


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def quadrant_features(images):
  """(n, 12) quadrant mean colours, centred on 128."""
  n, h, w, _ = images.shape
  blocks = images.reshape(n, 2, h // 2, 2, w // 2, 3).astype(np.float64)
  return blocks.mean(axis=(2, 4)).reshape(n, 12) - 128


def embed_fn(images):
  v = quadrant_features(images)
  n = np.linalg.norm(v, axis=1)
  return v / n[:, None], n


def design_image(feature):
  """A SIZE x SIZE image whose quadrant colours are 128 + feature."""
  colours = np.clip(np.round(128 + feature.reshape(2, 2, 3)), 0, 255)
  image = np.repeat(np.repeat(colours, SIZE // 2, 0), SIZE // 2, 1)
  return image.astype(np.uint8)


def write_jpeg(path: pathlib.Path, feature):
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(
      str(path), design_image(feature), [cv2.IMWRITE_JPEG_QUALITY, 100]
  )


def feature(rng, centre=None, noise=0.0):
  f = rng.uniform(-90, 90, 12) if centre is None else centre
  return np.clip(f + noise * rng.normal(size=12), -100, 100)


def stored_feature(path: pathlib.Path):
  """The unit feature of a written file, read back with plain OpenCV (the
  JPEG round trip moves colours by a level or two, enough to swap near
  ties, so the oracle scores what is on disk)."""
  return _unit(quadrant_features(cv2.imread(str(path))[None]))[0]


def tinyface_tree(root: pathlib.Path, rng, prefix=''):
  """Writes the three TinyFace folders; returns the design features."""
  centres = {i: feature(rng) for i in range(1, 7)}
  probes, matches, distractors = {}, {}, {}
  for i in range(1, 7):
    matches[f'{i}_10.jpg'] = centres[i]
    for j in (1, 2):
      probes[f'{i}_{j}.jpg'] = feature(rng, centres[i], noise=45)
  probes['9_1.jpg'] = feature(rng)  # identity 9 has no mate
  for j in range(12):
    distractors[f'{j}_0.jpg'] = feature(rng)  # names with a prefix, too
  distractors['copy_3_1.jpg'] = probes['3_1.jpg']  # beats probe 3_1's mate
  for folder, files in (
      ('Probe', probes),
      ('Gallery_Match', matches),
      ('Gallery_Distractor', distractors),
  ):
    for name, f in files.items():
      files[name] = root / folder / (prefix + name)
      write_jpeg(files[name], f)
  return probes, matches, distractors


def scface_tree(folder: pathlib.Path, rng):
  """Aligned SCface-named images; returns (gallery, probes by distance)."""
  centres = {i: feature(rng) for i in range(1, 7)}
  gallery = {f'{i:03d}_frontal': centres[i] for i in range(1, 7)}
  probes = {d: {} for d in (1, 2, 3)}
  files = dict(gallery)
  for i in range(1, 7):
    for cam in range(1, 9):
      for d in (1, 2, 3):
        name = f'{i:03d}_cam{cam}_{d}'
        noise = {1: 70, 2: 50, 3: 20}[d]  # farther is harder
        files[name] = feature(rng, centres[i], noise)
        if cam <= 5:
          probes[d][name] = files[name]
  files['001_L1'] = centres[2]  # rotated mugshots are not in the protocol
  for name, f in files.items():
    write_jpeg(folder / f'{name}.jpg', f)
  path = lambda files: {n: folder / f'{n}.jpg' for n in files}
  return path(gallery), {d: path(files) for d, files in probes.items()}


HALF_TEMPLATE = five_points.TEMPLATE_112 / 2  # landmarks of a 56 px loose crop


def ijb_tree(root: pathlib.Path, subset='IJBC'):
  """4 subjects x 2 templates, 1-3 medias each, 56 px crops. Template 32
  looks like nobody else, so subject 3's genuine pair scores low."""
  rng = np.random.default_rng(7)
  meta = root / subset / 'meta'
  crops = root / subset / 'loose_crop'
  meta.mkdir(parents=True)
  crops.mkdir(parents=True)
  points, tid_mid, rows = [], [], []
  number, media = 0, 500
  for subject in range(4):
    centre = rng.uniform(-80, 80, 12)
    for template in (10 * subject + 1, 10 * subject + 2):
      if template == 32:
        centre = rng.uniform(-80, 80, 12)
      for _ in range(rng.integers(1, 4)):
        media += 1
        for _ in range(rng.integers(1, 3)):
          number += 1
          f = np.clip(centre + rng.normal(0, 60, 12), -100, 100)
          colours = np.round(128 + f.reshape(2, 2, 3)).astype(np.uint8)
          image = np.repeat(np.repeat(colours, 28, 0), 28, 1)
          name = f'{number}.jpg'
          cv2.imwrite(str(crops / name), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
          score = rng.uniform(0.5, 1.0)
          coords = ' '.join(f'{v:.4f}' for v in HALF_TEMPLATE.reshape(-1))
          points.append(f'{name} {coords} {score:.4f}')
          tid_mid.append(f'{name} {template} {media}')
          rows.append((crops / name, template, media, score))
  s = subset.lower()
  (meta / f'{s}_name_5pts_score.txt').write_text('\n'.join(points) + '\n')
  (meta / f'{s}_face_tid_mid.txt').write_text('\n'.join(tid_mid) + '\n')
  templates = sorted({r[1] for r in rows})
  pairs = [
      (a, b, int(a // 10 == b // 10))
      for a, b in itertools.combinations(templates, 2)
  ]
  (meta / f'{s}_template_pair_label.txt').write_text(
      ''.join(f'{a} {b} {l}\n' for a, b, l in pairs)
  )
  # 1:N lists: subjects 0-1 in the first gallery set, 2-3 in the second
  # (their first templates), every second template a probe.
  first, second = ('S1', 'S2') if subset == 'IJBB' else ('G1', 'G2')
  for name, chosen in (
      (f'gallery_{first}', (1, 11)),
      (f'gallery_{second}', (21, 31)),
      ('probe_mixed', (2, 12, 22, 32)),
  ):
    (meta / f'{s}_1N_{name}.csv').write_text(
        'TEMPLATE_ID,SUBJECT_ID,FILENAME\n'
        + ''.join(f'{t},{t // 10},x.jpg\n' for t in chosen)
    )
  return rows, pairs


def write_bin(path: pathlib.Path, pairs: int = 20) -> None:
  """A verification set in the insightface .bin layout (pickled JPEGs)."""
  rng = np.random.default_rng(0)
  images, issame = [], []
  for i in range(pairs):
    a = feature(rng)
    b = feature(rng, a, noise=30) if i % 2 else feature(rng)
    for f in (a, b):
      ok, buf = cv2.imencode('.jpg', design_image(f))
      assert ok
      images.append(buf.tobytes())
    issame.append(bool(i % 2))
  path.write_bytes(pickle.dumps((images, issame)))


def own_faces(
    root: pathlib.Path, size: int, people: int = 8, photos: int = 6
) -> tuple[pathlib.Path, pathlib.Path]:
  """A folder of one sub-folder per person (generated faces at `size` px,
  aligned) and a pairs file over it: every same-person pair of a person's
  first three photos, and as many pairs of neighbours' first photos."""
  from qgjt_jax.data import synthetic

  folder = root / 'people'
  for person in range(people):
    (folder / f'p{person}').mkdir(parents=True)
    for photo in range(photos):
      cv2.imwrite(
          str(folder / f'p{person}' / f'{photo}.png'),
          synthetic.render_photo(1, person, photo, size),
      )
  lines = []
  for person in range(people):
    for a, b in itertools.combinations(range(3), 2):
      lines.append(f'people/p{person}/{a}.png people/p{person}/{b}.png 1')
    for other in range(person + 1, min(person + 4, people)):
      lines.append(f'people/p{person}/0.png people/p{other}/0.png 0')
  pairs = root / 'pairs.txt'
  pairs.write_text('\n'.join(lines) + '\n')
  return folder, pairs
